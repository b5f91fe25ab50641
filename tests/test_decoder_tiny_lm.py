"""Real weights: the tiny character-level Llama (fxcompress.examples.tiny_lm) trained at test time.

Trained for seconds on Python's own documentation text, it predicts held-out text far better
than chance, so the perplexity after compression means something: the exported graph gives the
same perplexity as PyTorch, int8-dynamic keeps it within a few percent.
"""

from __future__ import annotations

import pytest
import torch

import fxcompress

pytest.importorskip("transformers")

from fxcompress.examples import tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    return tiny_lm.train_tiny_lm(tiny_lm.TEST)


def test_the_corpus_ships_with_python_and_round_trips():
    text = tiny_lm.corpus()
    assert len(text) > 300_000
    data = tiny_lm.text_data()
    assert len(data.valid) == pytest.approx(0.1 * (len(data.train) + len(data.valid)), rel=0.01)
    sample = "for x in range(3):\n    print(x)"
    assert tiny_lm.decode(tiny_lm.encode(sample)) == sample
    assert tiny_lm.decode(tiny_lm.encode("café")) == "caf?"  # outside the alphabet


def test_training_beats_chance_on_held_out_text(trained):
    model, data = trained
    untrained = tiny_lm.build_model(tiny_lm.TEST).eval()
    before = tiny_lm.perplexity(untrained, data.valid, windows=16)
    after = tiny_lm.perplexity(model, data.valid, windows=16)
    assert before > 0.8 * len(tiny_lm.ALPHABET)  # chance: about the alphabet's size
    assert after < 0.4 * before


def test_perplexity_through_onnx_matches_pytorch_and_int8_keeps_it(trained, tmp_path):
    model, data = trained
    reference = tiny_lm.perplexity(model, data.valid, windows=16)
    result = fxcompress.compile_decoder(model)
    assert tiny_lm.perplexity(result.module, data.valid, windows=16, spec=result.spec) == pytest.approx(reference, rel=1e-5)
    path = result.export_onnx(tmp_path / "tiny.onnx")
    assert tiny_lm.perplexity(path, data.valid, windows=16) == pytest.approx(reference, rel=1e-4)
    int8 = fxcompress.compile_decoder(model, recipe="int8-dynamic").export_onnx(tmp_path / "tiny-int8.onnx")
    assert tiny_lm.perplexity(int8, data.valid, windows=16) == pytest.approx(reference, rel=0.05)
    prompt = tiny_lm.encode("The ")[None]
    text = tiny_lm.decode(fxcompress.generate(path, prompt, max_new_tokens=20, do_sample=True, seed=0)[0])
    assert text.startswith("The ") and len(text) == 24


def test_weight_only_presets_keep_perplexity_and_gptq_beats_round_to_nearest(trained, tmp_path):
    """The issue's bounds on real weights (in ONNX Runtime, every held-out window): int8-weights
    within 3%, int4-weights (GPTQ on training-text windows) within 10% and below int4
    round-to-nearest. Measured here: RTN +0.13%, GPTQ between -0.03% and +0.04% over three
    calibration sets (PyTorch)."""
    model, data = trained
    context = tiny_lm.TEST.context
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data.train) - context, (16,), generator=generator).tolist()
    calibration = [data.train[s:s + context][None] for s in starts]
    reference = tiny_lm.perplexity(model, data.valid, context=context, windows=None)
    rise = {}
    for label, recipe, prompts in (("int8-weights", "int8-weights", None), ("gptq", "int4-weights", calibration),
                                   ("rtn", ["quantize-weights"], None)):
        result = fxcompress.compile_decoder(model, recipe=recipe, calibration=prompts, prefill_recipe=None, tolerance=0.3)
        path = result.export_onnx(tmp_path / f"{label}.onnx")
        rise[label] = tiny_lm.perplexity(path, data.valid, context=context, windows=None) / reference - 1
    assert rise["int8-weights"] < 0.03 and rise["gptq"] < 0.10, rise
    assert rise["gptq"] < rise["rtn"], rise


@pytest.mark.slow
def test_decoder_benchmark_quick_run_writes_its_tables(tmp_path):
    """benchmarks/decoder.py --quick: every variant, peer and shape on small models (about 3 min)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "decoder.py"), "--quick", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "decoder.json").read_text())
    rows = {row["variant"]: row for row in report["quality"]["rows"]}
    assert {"fp32", "int8-dynamic", "int8-weights", "int4-weights", "ORT int4 RTN block 32, acc 4",
            "ORT int4 HQQ block 32", "ORT quantize_dynamic"} <= set(rows)
    # the fp32 export is the trained model: same perplexity, same 64 greedy tokens
    assert rows["fp32"]["ppl"] == pytest.approx(report["quality"]["ppl_transformers"], rel=1e-4)
    assert rows["fp32"]["greedy_agree_64"] == 64
    assert all(row["ppl"] < report["quality"]["chance_ppl"] / 2 for row in rows.values())
    speed = report["speed"]
    assert len(speed["shapes"]) == 12 and all(len(row["ms"]) == 6 for row in speed["shapes"])
    assert speed["graphs_chosen"] == {"prefill": "int8-dynamic", "decode": "int4-weights"}
    assert speed["bytes"]["int4-weights"] < 0.3 * speed["bytes"]["fp32"]
    text = (tmp_path / "decoder.md").read_text()
    assert "| int4-weights |" in text and "| prefill | 4 | 128 |" in text
