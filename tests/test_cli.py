"""The command line: compile, bench, passes, and clear errors with exit status 2."""

from __future__ import annotations

import onnx
import pytest
import torch

from fxcompress.cli import main


def test_compile_factory_spec(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["compile", "tests.models:conv_bn_relu", "--out", str(out), "--runs", "8"]) == 0
    text = capsys.readouterr().out
    assert "Compiling tests.models:conv_bn_relu" in text
    assert "Parity (ONNX in ORT vs original model):  PASS" in text
    assert "plain torch.onnx.export" in text and "fxcompress default" in text
    assert f"Wrote {out}" in text
    onnx.checker.check_model(onnx.load(str(out)))


def test_bench_prints_provider(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    main(["compile", "tests.models:conv_bn_relu", "--out", str(out), "--no-baseline", "--runs", "8"])
    capsys.readouterr()
    assert main(["bench", str(out), "--runs", "5", "--warmup", "1"]) == 0
    assert "on cpu" in capsys.readouterr().out
    assert main(["bench", str(out), "--runs", "5", "--warmup", "1", "--ops", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "kernel time per op type" in text and "threads: 1" in text
    conv_line = next(line for line in text.splitlines() if line.split()[:1] in (["Conv"], ["FusedConv"]))
    assert float(conv_line.split()[2]) > 0  # ms of the conv kernels


def test_iters_is_a_deprecated_spelling_of_runs(capsys):
    from fxcompress.cli import build_parser

    for command in (["bench", "m.onnx"], ["sweep", "torchvision:resnet18", "--log", "s.jsonl"], ["compile", "x:y", "--out", "m.onnx"]):
        assert build_parser().parse_args([*command, "--iters", "7"]).runs == 7
        assert "--iters is deprecated; use --runs" in capsys.readouterr().err
        assert build_parser().parse_args([*command, "--runs", "7"]).runs == 7
        assert capsys.readouterr().err == ""


def test_passes_lists_registry(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert "eliminate-dead-code" in text and "drop_unused_state" in text and "Presets:" in text


def test_pickle_needs_trust_flag(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    code = main(["compile", str(path), "--out", str(tmp_path / "o.onnx"), "--input-shape", "1,2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pickled file" in err and "--trust-pickle" in err
    assert not (tmp_path / "o.onnx").exists()
    assert main(["compile", str(path), "--out", str(tmp_path / "o.onnx"), "--input-shape", "1,2",
                 "--trust-pickle", "--no-baseline", "--runs", "8"]) == 0


def test_pt2_archive(tmp_path, capsys):
    from tests.models import conv_bn_relu

    model, inputs = conv_bn_relu()
    archive = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, inputs), str(archive))
    assert main(["compile", str(archive), "--out", str(tmp_path / "a.onnx"), "--no-baseline", "--runs", "8"]) == 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compile", "torchvision:resnet181", "--out", "{tmp}/x.onnx"], "did you mean resnet18"),
        (["compile", "tests.models:conv_bn_relu", "--recipe", "nope", "--out", "{tmp}/x.onnx"], "Unknown recipe 'nope'"),
        (["compile", "tests.models:conv_bn_relu", "--out", "{tmp}/missing/x.onnx"], "does not exist"),
        (["compile", "{tmp}/none.pt2", "--out", "{tmp}/x.onnx"], "does not exist"),
        (["bench", "{tmp}/none.onnx"], "does not exist"),
        (["compile", "nomodule_xyz:make", "--out", "{tmp}/x.onnx"], "Cannot import 'nomodule_xyz'"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(tmp_path, capsys, argv, fragment):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_import_registers_the_users_pass(tmp_path, capsys, monkeypatch):
    package = tmp_path / "user_passes_cli"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from fxcompress.infra.pass_base import Pass, PassResult\n"
        "from fxcompress.infra.registry import register\n\n"
        "@register\n"
        "class CountNodes(Pass):\n"
        "    '''Counts the graph's nodes and changes nothing.'''\n"
        "    name = 'count-nodes-cli'\n\n"
        "    def call(self, graph_module):\n"
        "        return PassResult(graph_module, False, {'nodes_seen': len(graph_module.graph.nodes)})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = [{ pipeline = "default" }, "count-nodes-cli"]\n')
    assert main(["passes", "--import", "user_passes_cli"]) == 0
    assert "count-nodes-cli" in capsys.readouterr().out
    out = tmp_path / "m.onnx"
    assert main(["compile", "tests.models:conv_bn_relu", "--import", "user_passes_cli", "--recipe", str(recipe),
                 "--out", str(out), "--no-baseline", "--runs", "8"]) == 0
    assert "nodes_seen" in capsys.readouterr().out
    code = main(["compile", "tests.models:conv_bn_relu", "--import", "no_such_module_xyz", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_module_xyz" in err and "PYTHONPATH" in err
    assert not (tmp_path / "x.onnx").exists()


def test_compile_a_factory_returning_keyword_inputs(tmp_path, capsys):
    out = tmp_path / "kw.onnx"
    assert main(["compile", "tests.models:keyword_encoder", "--recipe", "int8-dynamic", "--calibration", "random:4",
                 "--out", str(out), "--runs", "8"]) == 0
    text = capsys.readouterr().out
    assert "(int64[2, 6], int64[2, 6])" in text and "Parity (ONNX in ORT vs original model):  PASS" in text
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["input_ids", "attention_mask"]
