"""Two design choices of the decoder path, each measured against its alternative.

    python benchmarks/decoder_ablations.py          # both parts (minutes)

1. **Embedding bits under int4** (quality, real weights): the trained tiny_lm of
   benchmarks/decoder.py (``tiny_lm.BENCHMARK``), ``quantize-weights`` with 4-bit layers and
   ``embedding_bits`` 4 or 8 (8: the tied table gets an 8-bit copy for the lookups and lm_head its
   own 4-bit one), round-to-nearest and GPTQ (16 and 64 calibration windows of the training
   text). Perplexity of ``result.module`` in PyTorch over every held-out window: this isolates the
   weights (ORT's int8 activations under accuracy_level 4 are left out).
2. **No thread spinning for the prompt session** (speed): the ``int4-weights`` pair (int8-dynamic
   prompt graph, int4 decode graph) of the 6 x 768 Llama of benchmarks/decoder.py, ``generate``
   with a 128-token prompt and 32 new tokens, the prompt session with ORT's spinning on and off
   (what ``decoder_session`` does), and ``int8-dynamic`` as one graph beside them; interleaved.

Run timing alone (``flock /tmp/fxcompress-timing.lock``). Writes
benchmarks/results/decoder_ablations.md and .json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, machine_description, write_results  # noqa: E402
from decoder import calibration_prompts, speed_model  # noqa: E402
from fxcompress.examples import tiny_lm  # noqa: E402
from fxcompress.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from fxcompress.runtime.generate import DecoderSession, decoder_session  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import time_interleaved  # noqa: E402

CALIBRATION_SEED = 777


def embedding_bits() -> dict:
    preset = tiny_lm.BENCHMARK
    model, data = tiny_lm.train_tiny_lm(preset)
    base = tiny_lm.perplexity(model, data.valid, context=preset.context, windows=None)
    rows = []
    for method, windows in (("rtn", 0), ("gptq", 16), ("gptq", 64)):
        calibration = calibration_prompts(data.train, preset.context, CALIBRATION_SEED, windows) if windows else None
        for bits in (4, 8):
            result = fxcompress.compile_decoder(model, [QuantizeWeightsPass(method=method, embedding_bits=bits)],
                                                calibration=calibration, prefill_recipe=None, tolerance=0.3)
            ppl = tiny_lm.perplexity(result.module, data.valid, context=preset.context, windows=None, spec=result.spec)
            rows.append({"method": method, "calibration_windows": windows, "embedding_bits": bits,
                         "ppl": ppl, "rise_pct": 100 * (ppl / base - 1)})
            print(f"  {method} ({windows} windows), embedding_bits={bits}: {rows[-1]['rise_pct']:+.3f}%", flush=True)
    return {"fp32_ppl": base, "rows": rows}


def prompt_spinning(folder: Path) -> dict:
    model = speed_model(quick=False)
    pair = fxcompress.compile_decoder(model, recipe="int4-weights").export_onnx(folder / "pair.onnx")
    single = fxcompress.compile_decoder(model, recipe="int8-dynamic", prefill_recipe=None).export_onnx(folder / "i8.onnx")
    as_shipped = decoder_session(pair)
    spinning = DecoderSession(as_shipped.runtime, as_shipped.spec, create_session(folder / "pair.prefill.onnx"))
    sessions = {"pair, prompt session spinning": spinning, "pair, prompt session not spinning (shipped)": as_shipped,
                "int8-dynamic, one graph": decoder_session(single)}
    prompt = torch.randint(0, as_shipped.spec.vocab_size, (1, 128), generator=torch.Generator().manual_seed(5))
    runners = {label: (lambda s=s: fxcompress.generate(s, prompt, max_new_tokens=32, eos_token_id=None))
               for label, s in sessions.items()}
    stats = time_interleaved(runners, rounds=7, block=1, warmup=1)
    return {"prompt": 128, "new_tokens": 32, "runs": 7,
            "seconds": {label: round(s["p50_ms"] / 1000, 3) for label, s in stats.items()}}


def _markdown(report: dict) -> str:
    e, s = report["embedding_bits"], report["prompt_spinning"]
    lines = ["# Decoder ablations", "", f"`{report['command']}` on {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores), {report['date_utc']} UTC.", "",
             "## Embedding bits under int4 (trained tiny_lm, PyTorch, every held-out window)", "",
             f"fp32 perplexity {e['fp32_ppl']:.4f}. Rise per variant:", "",
             "| method | calibration windows | embedding_bits=4 | embedding_bits=8 |", "|---|---|---|---|"]
    for method, windows in dict.fromkeys((r["method"], r["calibration_windows"]) for r in e["rows"]):
        rise = {r["embedding_bits"]: r["rise_pct"] for r in e["rows"]
                if (r["method"], r["calibration_windows"]) == (method, windows)}
        lines.append(f"| {method} | {windows or '-'} | {rise[4]:+.3f}% | {rise[8]:+.3f}% |")
    lines += ["", f"## Prompt session spinning (6 x 768 Llama, {s['prompt']}-token prompt, {s['new_tokens']} new "
              f"tokens, median of {s['runs']} interleaved runs)", "", "| sessions | seconds |", "|---|---|"]
    lines += [f"| {label} | {seconds:.3f} |" for label, seconds in s["seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for decoder_ablations.md / .json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        report = {"command": command_line(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  "machine": machine_description("cpu"), "embedding_bits": embedding_bits(),
                  "prompt_spinning": prompt_spinning(Path(folder))}
    write_results(args.out, "decoder_ablations", report, _markdown(report))
    return report


if __name__ == "__main__":
    main()
