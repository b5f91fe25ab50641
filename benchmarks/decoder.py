"""Decoder LLM benchmark: a causal LM with real weights, compressed, exported and generated from.

    python benchmarks/decoder.py                  # tiny_lm BENCHMARK preset (a few minutes of training)
    python benchmarks/decoder.py --quick          # the TEST preset (seconds): a smoke run
    python benchmarks/decoder.py --recipes default int8-dynamic

The model is fxcompress.examples.tiny_lm: a character-level Llama trained at run time on Python's
own documentation (``pydoc_data.topics``); the last tenth of that text is held out. Per recipe:
held-out perplexity in PyTorch (compiled module) and through the exported ONNX graph in ONNX
Runtime, the ONNX file size, whether 64 greedy tokens from the fp32 export equal transformers'
``generate``, and greedy generation throughput in ONNX Runtime (prefill + decode with the cache
bound through IO binding; median of interleaved rounds, CPU provider).

Timing runs must not overlap other timing runs: run it under ``flock /tmp/fxcompress-timing.lock``
on shared machines. Writes benchmarks/results/decoder.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, machine_description  # noqa: E402
from fxcompress.examples import tiny_lm  # noqa: E402
from fxcompress.runtime.generate import decoder_session  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny_lm TEST preset and fewer rounds")
    parser.add_argument("--recipes", nargs="+", default=["default", "int8-dynamic"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for decoder.md / .json")
    args = parser.parse_args(argv)
    preset = tiny_lm.TEST if args.quick else tiny_lm.BENCHMARK
    rounds = args.rounds or (2 if args.quick else 5)
    windows = 16 if args.quick else 64

    start = time.perf_counter()
    model, data = tiny_lm.train_tiny_lm(preset)
    train_seconds = time.perf_counter() - start
    reference_ppl = tiny_lm.perplexity(model, data.valid, context=preset.context, windows=windows)
    prompt = tiny_lm.encode("The for statement is used to ")[None]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sessions = {}
        for recipe in args.recipes:
            begin = time.perf_counter()
            result = fxcompress.compile_decoder(model, recipe=recipe)
            path = result.export_onnx(Path(folder) / f"{recipe}.onnx")
            seconds = time.perf_counter() - begin
            session = sessions[recipe] = decoder_session(path)
            greedy = fxcompress.generate(session, prompt, max_new_tokens=64, eos_token_id=None)
            reference = model.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
            rows.append({
                "recipe": recipe,
                "compile_export_s": round(seconds, 1),
                "ppl_torch": round(tiny_lm.perplexity(result.module, data.valid, context=preset.context, windows=windows,
                                                      spec=result.spec), 4),
                "ppl_onnx": round(tiny_lm.perplexity(session, data.valid, context=preset.context, windows=windows), 4),
                "onnx_mb": round(os.path.getsize(path) / 1e6, 3),
                "greedy64_equals_hf": bool(torch.equal(greedy, reference)),
                "sample": tiny_lm.decode(greedy[0]),
            })
        # interleaved: each round times every recipe once, so drift in machine load hits all alike
        times: dict[str, list[float]] = {r: [] for r in args.recipes}
        for _ in range(rounds):
            for recipe in args.recipes:
                begin = time.perf_counter()
                fxcompress.generate(sessions[recipe], prompt, max_new_tokens=128, eos_token_id=None)
                times[recipe].append(time.perf_counter() - begin)
        for row in rows:
            row["tokens_per_s"] = round(128 / statistics.median(times[row["recipe"]]), 1)
    report = {
        "command": command_line(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine_description("cpu"),
        "model": {**preset.__dict__, "train_seconds": round(train_seconds, 1), "trained_steps": model.trained_steps,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "perplexity_untrained_chance": len(tiny_lm.ALPHABET),
        "ppl_hf_fp32": round(reference_ppl, 4),
        "rows": rows,
    }
    out = Path(args.out) / "decoder"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Decoder LLM benchmark (tiny_lm, real weights)", "",
        f"`{report['command']}` on {report['machine']['cpu']} ({report['machine']['cores']} cores; torch "
        f"{report['machine']['torch']}, onnxruntime {report['machine']['onnxruntime']}), {report['date_utc']} UTC. Model: character-level Llama, "
        f"{report['model']['parameters']:,} parameters, {report['model']['layers']} layers x {report['model']['hidden']}, "
        f"trained {report['model']['trained_steps']} steps ({report['model']['train_seconds']} s) on pydoc_data.topics; held-out perplexity of the transformers "
        f"model {report['ppl_hf_fp32']} (chance: {report['perplexity_untrained_chance']}).", "",
        "| recipe | ppl PyTorch | ppl ONNX | ONNX MB | greedy 64 = HF generate | tokens/s (ORT CPU, 128 new) | compile+export s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['ppl_torch']} | {row['ppl_onnx']} | {row['onnx_mb']} | "
                     f"{'yes' if row['greedy64_equals_hf'] else 'no'} | {row['tokens_per_s']} | {row['compile_export_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
