"""The compile report informs: each pass once per pipeline with its rounds, aligned columns, short
stats, parameter counts that do not double after a fold, and per-layer figures that are true."""

from __future__ import annotations

import io

import torch
from torch import nn

import fxcompress
from fxcompress.inspect.pass_table import COLUMNS
from fxcompress.inspect.render_html import layer_table_rows
from tests.models import ConvBnRelu, randomize_bn


def _model():
    torch.manual_seed(0)
    return randomize_bn(ConvBnRelu(channels=8).eval()), (torch.randn(1, 3, 16, 16),)


def _column_starts(line: str, header: str) -> list[int]:
    return [header.index(name) for name in COLUMNS]


def test_each_pass_once_per_pipeline_with_its_rounds():
    model, inputs = _model()
    result = fxcompress.compile(model, inputs, "int8", calibration=[inputs] * 2)
    table = result.report.table()
    lines = table.splitlines()
    default_runs = [r for r in result.report.records if r.name == "default/fold-batchnorm"]
    assert len(default_runs) >= 2  # the default pipeline repeats to its fixed point...
    fold_rows = [line for line in lines if line.strip().startswith("fold-batchnorm")]
    assert len(fold_rows) == 1  # ...but its passes appear once, with the number of rounds
    assert fold_rows[0].split()[1] == str(len(default_runs))
    assert "[default]" in table
    header = lines[0]
    # aligned: every right-aligned figure ends where its column heading ends
    end = header.index("rounds") + len("rounds")
    assert all(line[end - 1].isdigit() for line in lines if line.strip().startswith(("fold-batchnorm", "quantize-int8")))
    quant = next(line for line in lines if line.startswith("quantize-int8"))
    assert "layers" in quant and "{" not in quant  # the per-layer list is a count here, detail in the HTML


def test_a_tty_gets_a_rich_table_and_a_pipe_plain_text():
    model, inputs = _model()
    report = fxcompress.compile(model, inputs, "default").report

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe, tty = io.StringIO(), Tty()
    report.print_table(pipe)
    report.print_table(tty)
    assert pipe.getvalue().strip() == report.table()
    assert "━" in tty.getvalue() or "─" in tty.getvalue()  # rich's box drawing
    assert "fold-batchnorm" in tty.getvalue()


def test_params_do_not_double_after_folding_batch_norm():
    model, inputs = _model()
    report = fxcompress.compile(model, inputs, "default").report
    fold = next(r for r in report.records if r.name == "fold-batchnorm" and r.modified)
    stored = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert report.params_before == stored
    assert fold.params_after < fold.params_before  # the BN's scale/shift/stats are gone, not duplicated
    assert report.params_after == fold.params_after


def _rows(result):
    return {row[0]: row for row in layer_table_rows(result)}


def test_per_layer_figures_of_a_quantized_model_count_the_weight():
    model, inputs = _model()
    rows = _rows(fxcompress.compile(model, inputs, "int8", calibration=[inputs] * 2))
    conv, fc = rows["conv"], rows["fc"]
    assert conv[1].startswith("int8") and conv[2] == f"{8 * 3 * 3 * 3:,}" and conv[3] != "100.0%"
    assert fc[2] == f"{10 * 8:,}"


def test_per_layer_figures_of_a_sparse_model_show_the_imposed_sparsity():
    model, inputs = _model()
    result = fxcompress.compile(model, inputs, "sparse")
    rows = _rows(result)
    weights = {name: float(row[3].rstrip("%")) for name, row in rows.items() if row[3] != "-"}
    assert weights
    stored = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in stored)
    zeros = sum(float(row[3].rstrip("%")) / 100 * int(row[2].replace(",", "")) for row in rows.values() if row[3] != "-")
    assert abs(zeros / total - 0.5) < 0.02  # global 50% magnitude sparsity, read back per layer


def test_per_layer_figures_of_a_pruned_model_show_the_smaller_layers():
    model, inputs = _model()
    rows = _rows(fxcompress.compile(model, inputs, "prune"))
    assert rows["conv"][2] == f"{4 * 3 * 3 * 3:,}"  # half of 8 output channels kept
    assert rows["fc"][2] == f"{10 * 4:,}"
