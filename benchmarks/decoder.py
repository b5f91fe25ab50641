"""Decoder LLMs: weight-only int4/int8 and dynamic int8 against ORT's quantizers, quality and speed.

    python benchmarks/decoder.py            # trained tiny_lm (minutes) + a 6x768 Llama, vocab 32000
    python benchmarks/decoder.py --quick    # a dry run of every step on small models (CI)

Two parts, side by side in one run (ORT CPU provider; interleaved timing):

1. **Quality, real weights**: fxcompress.examples.tiny_lm (a character-level Llama trained at run
   time on ``pydoc_data.topics``; the last tenth held out). Each variant is one ONNX graph:
   fxcompress ``default`` (fp32), ``int8-dynamic``, ``int8-weights``, ``int4-weights`` (GPTQ on 32
   calibration windows of the training text, and again on two other sets of windows for the
   spread), int4 round-to-nearest; and ORT's peers applied to
   the fp32 export: ``MatMulNBitsQuantizer`` (defaults: RTN, asymmetric, block 128; RTN block 32
   with accuracy_level 4; HQQ block 32) and ``quantize_dynamic``. Held-out perplexity in ORT (all
   of the held-out tenth), its rise over fp32, file size, and 64 greedy tokens after each of 8
   held-out prompts against transformers' ``generate`` of the trained model (tokens equal, in
   order, before the first difference).
2. **Speed, random weights**: a Llama of 6 layers x 768 (12 heads, 4 KV heads, MLP 2048, vocab
   32000, untied lm_head): decode (one token after a 128-token cache, batch 1 and 4) and prefill
   (lengths 1, 16, 32, 64, 128 x batch 1, 4, empty cache) per variant, each one graph; the
   fastest variant per shape; and what the ``int4-weights`` preset chose per graph
   (``result.graphs``: the prompt on ``int8-dynamic``, decoding on int4) timed end to end
   with ``fxcompress.generate`` (128-token prompt, 32 new tokens) against the single graphs.
   Speed does not depend on the weights' values; ``int4-weights`` runs round-to-nearest there
   (no calibration), the same kernels as GPTQ.

Timing runs must not overlap other timing runs: run it under ``flock /tmp/fxcompress-timing.lock``
on shared machines. Writes benchmarks/results/decoder.md and .json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxcompress  # noqa: E402
from common import command_line, machine_description, write_results  # noqa: E402
from fxcompress.capture_decoder import DECODER_METADATA, step_inputs  # noqa: E402
from fxcompress.examples import tiny_lm  # noqa: E402
from fxcompress.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from fxcompress.runtime.generate import decoder_session  # noqa: E402
from fxcompress.runtime.timing import time_interleaved  # noqa: E402

PREFILL_LENGTHS = (1, 16, 32, 64, 128)
BATCHES = (1, 4)
DECODE_PAST = 128
#: interleaved rounds x timed runs per variant: one-token steps take milliseconds, where a shared
#: machine's noise is a few percent, so they get 80 samples; longer steps 20
ONE_TOKEN_TIMING = (10, 8)
LONGER_TIMING = (5, 4)
#: the fxcompress variants: label -> recipe (one graph each: prefill_recipe=None)
OURS: dict[str, Any] = {
    "fp32": "default",
    "int8-dynamic": "int8-dynamic",
    "int8-weights": "int8-weights",
    "int4-weights": "int4-weights",
}


# ---------------------------------------------------------------------------------------------
# ORT's quantizers, applied to the fp32 export


def _keep_decoder_metadata(quantized: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """The peer's file with the fp32 file's decoder description (so generate() and perplexity run it)."""
    if not any(p.key == DECODER_METADATA for p in quantized.metadata_props):
        onnx.helper.set_model_props(quantized, {**{p.key: p.value for p in quantized.metadata_props},
                                                DECODER_METADATA: next(p.value for p in source.metadata_props
                                                                       if p.key == DECODER_METADATA)})
    return quantized


def ort_nbits(fp32: Path, out: Path, config: str) -> Path:
    """ORT's MatMulNBitsQuantizer: "default" (its defaults), "rtn32" (block 32, accuracy_level 4), "hqq32"."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    source = onnx.load(str(fp32))
    if config == "default":
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)))
    elif config == "rtn32":
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, accuracy_level=4)
    elif config == "hqq32":
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=HQQWeightOnlyQuantConfig(block_size=32))
    else:
        raise ValueError(config)
    quantizer.process()
    onnx.save(_keep_decoder_metadata(quantizer.model.model, source), str(out))
    return out


def ort_dynamic(fp32: Path, out: Path) -> Path:
    """ORT's quantize_dynamic with its defaults (int8 weights, per tensor) on MatMul and Gather.

    Its default op list also holds ``Attention``, meaning ORT's own com.microsoft one: on the
    decoder's opset-23 ONNX ``Attention`` it writes a QAttention ORT then refuses to load.
    """
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gather"])
    onnx.save(_keep_decoder_metadata(onnx.load(str(out)), onnx.load(str(fp32))), str(out))
    return out


PEERS: dict[str, Callable[[Path, Path], Path]] = {
    "ORT int4 RTN (defaults: block 128)": lambda fp32, out: ort_nbits(fp32, out, "default"),
    "ORT int4 RTN block 32, acc 4": lambda fp32, out: ort_nbits(fp32, out, "rtn32"),
    "ORT int4 HQQ block 32": lambda fp32, out: ort_nbits(fp32, out, "hqq32"),
    "ORT quantize_dynamic": ort_dynamic,
}


def export_variants(model, folder: Path, calibration: Any, extra: dict[str, Any] | None = None,
                    peers: tuple[str, ...] = tuple(PEERS)) -> dict[str, Path]:
    """label -> ONNX path: fxcompress's variants (one graph each), then ORT's on the fp32 export."""
    paths: dict[str, Path] = {}
    for label, recipe in {**OURS, **(extra or {})}.items():
        begin = time.perf_counter()
        # an ad-hoc pass list gets the int4-weights preset's tolerance (its own default is 0.05)
        tolerance = 0.3 if isinstance(recipe, list) else None
        result = fxcompress.compile_decoder(model, recipe=recipe, calibration=calibration, prefill_recipe=None,
                                            tolerance=tolerance)
        paths[label] = result.export_onnx(folder / f"v{len(paths)}.onnx")
        print(f"  {label}: compiled and exported in {time.perf_counter() - begin:.0f} s", flush=True)
    for label in peers:
        paths[label] = PEERS[label](paths["fp32"], folder / f"v{len(paths)}.onnx")
        print(f"  {label}: quantized", flush=True)
    return paths


# ---------------------------------------------------------------------------------------------
# 1. quality on the trained tiny LM


def greedy_agreement(tokens: torch.Tensor, reference: torch.Tensor, prompt_length: int) -> int:
    """New tokens equal to the reference's, in order, before the first difference."""
    new, ref = tokens[0, prompt_length:], reference[0, prompt_length:]
    differ = (new != ref).nonzero()
    return int(differ[0]) if len(differ) else int(len(new))


#: calibration prompts for GPTQ: this many windows of the training text (the preset reads up to 32)
CALIBRATION_PROMPTS = 32
#: seeds of the calibration windows: the first calibrates ``int4-weights``; the others give the
#: spread GPTQ's result has over calibration sets (rows "int4-weights, calibration set N")
CALIBRATION_SEEDS = (777, 778, 779)
#: greedy agreement: this many prompts from the held-out text, 64 new tokens each
GREEDY_PROMPTS = 8


def calibration_prompts(train: torch.Tensor, context: int, seed: int, count: int = CALIBRATION_PROMPTS) -> list[torch.Tensor]:
    """``count`` windows of ``context`` tokens from random places of the training text."""
    starts = torch.randint(0, len(train) - context, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[s:s + context][None] for s in starts]


def quality(folder: Path, quick: bool) -> dict:
    preset = tiny_lm.TEST if quick else tiny_lm.BENCHMARK
    begin = time.perf_counter()
    model, data = tiny_lm.train_tiny_lm(preset)
    train_seconds = time.perf_counter() - begin
    calibration = calibration_prompts(data.train, preset.context, CALIBRATION_SEEDS[0])
    windows = 16 if quick else None  # None: every window of the held-out text
    print(f"tiny_lm trained ({train_seconds:.0f} s); exporting the variants", flush=True)
    extra = {"int4 round-to-nearest": ["quantize-weights"]}
    paths = export_variants(model, folder, calibration, extra)
    for n, seed in enumerate(CALIBRATION_SEEDS[1:], start=2):
        result = fxcompress.compile_decoder(model, recipe="int4-weights", prefill_recipe=None,
                                            calibration=calibration_prompts(data.train, preset.context, seed))
        paths[f"int4-weights, calibration set {n}"] = result.export_onnx(folder / f"v{len(paths)}.onnx")
    prompt_starts = torch.linspace(0, len(data.valid) - 64, GREEDY_PROMPTS).long().tolist()
    prompts = [data.valid[s:s + 32][None] for s in prompt_starts]
    # The mask is explicit: without one, generate() masks every token equal to pad_token_id, and id 0
    # is the newline here.
    references = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=64, do_sample=False,
                                 eos_token_id=None, pad_token_id=0) for p in prompts]
    rows = []
    for label, path in paths.items():
        session = decoder_session(path)
        agreement = [greedy_agreement(fxcompress.generate(session, p, max_new_tokens=64, eos_token_id=None), r, p.shape[1])
                     for p, r in zip(prompts, references)]
        rows.append({"variant": label, "ppl": tiny_lm.perplexity(session, data.valid, context=preset.context,
                                                                 windows=windows),
                     "bytes": path.stat().st_size, "greedy_agree_64": sum(agreement) / len(agreement),
                     "greedy_all_64": sum(a == 64 for a in agreement)})
    base = rows[0]
    for row in rows:
        row["ppl_rise_pct"] = 100 * (row["ppl"] / base["ppl"] - 1)
        row["size_vs_fp32"] = row["bytes"] / base["bytes"]
    count = (len(data.valid) - 1) // preset.context if windows is None else windows
    return {"model": {**preset.__dict__, "parameters": sum(p.numel() for p in model.parameters()),
                      "trained_steps": model.trained_steps, "train_seconds": round(train_seconds, 1)},
            "ppl_transformers": tiny_lm.perplexity(model, data.valid, context=preset.context, windows=windows),
            "ppl_tokens": count * preset.context, "calibration": {"prompts": CALIBRATION_PROMPTS, "seeds": CALIBRATION_SEEDS},
            "greedy_prompts": GREEDY_PROMPTS, "chance_ppl": len(tiny_lm.ALPHABET), "rows": rows}


# ---------------------------------------------------------------------------------------------
# 2. speed on the random-weight 6 x 768 Llama


def speed_model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096) if quick else
            dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000))
    return LlamaForCausalLM(LlamaConfig(**size, max_position_embeddings=1024, tie_word_embeddings=False)).eval()


def _feeds(spec, batch: int, length: int, past: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(0, spec.vocab_size, (batch, length), generator=generator)
    cache = None if past == 0 else [torch.randn(spec.past_shape(i, batch, past), generator=generator)
                                    for i in range(2 * spec.layers)]
    return {name: t.numpy() for name, t in zip(spec.input_names, step_inputs(spec, ids, cache))}


def speed(folder: Path, quick: bool) -> dict:
    model = speed_model(quick)
    print("speed model built; exporting the variants", flush=True)
    peers = ("ORT int4 RTN block 32, acc 4", "ORT quantize_dynamic")
    paths = export_variants(model, folder, None, peers=peers)
    sessions = {label: decoder_session(path) for label, path in paths.items()}
    spec = next(iter(sessions.values())).spec
    shapes = [("decode", b, 1, DECODE_PAST) for b in BATCHES] + \
             [("prefill", b, n, 0) for b in BATCHES for n in PREFILL_LENGTHS]
    table = []
    for kind, batch, length, past in shapes:
        rounds, block = (1, 1) if quick else ONE_TOKEN_TIMING if length == 1 else LONGER_TIMING
        feeds = _feeds(spec, batch, length, past)
        runners = {label: (lambda s=s: s.runtime.session.run(["logits"], feeds)) for label, s in sessions.items()}
        stats = time_interleaved(runners, rounds=rounds, block=block, warmup=1)
        row = {"kind": kind, "batch": batch, "tokens": length, "past": past, "samples": rounds * block,
               "ms": {label: round(s["p50_ms"], 3) for label, s in stats.items()}}
        row["fastest"] = min(row["ms"], key=row["ms"].get)
        table.append(row)
        print(f"  {kind} batch {batch} x {length} (past {past}): " +
              ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()), flush=True)
    # The preset's own choice per graph, end to end: prompt on the prefill graph, decoding on int4.
    chosen = fxcompress.compile_decoder(model, recipe="int4-weights")
    pair_path = chosen.export_onnx(folder / "chosen.onnx")
    generation = {f"int4-weights as chosen ({chosen.graphs['prefill']} prefill)": decoder_session(pair_path),
                  **{label: sessions[label] for label in ("fp32", "int8-dynamic", "int4-weights")}}
    prompt = torch.randint(0, spec.vocab_size, (1, 128), generator=torch.Generator().manual_seed(5))
    new_tokens = 4 if quick else 32
    runners = {label: (lambda s=s: fxcompress.generate(s, prompt, max_new_tokens=new_tokens, eos_token_id=None))
               for label, s in generation.items()}
    generate_runs = 1 if quick else 7
    stats = time_interleaved(runners, rounds=generate_runs, block=1, warmup=1)
    return {"model": {"layers": spec.layers, "hidden": model.config.hidden_size, "vocab": spec.vocab_size,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "graphs_chosen": chosen.graphs, "timing": {"one token": ONE_TOKEN_TIMING, "longer": LONGER_TIMING},
            "bytes": {label: path.stat().st_size for label, path in paths.items()},
            "shapes": table,
            "generate": {"prompt": 128, "new_tokens": new_tokens, "runs": generate_runs,
                         "seconds": {label: round(s["p50_ms"] / 1000, 3) for label, s in stats.items()}}}


# ---------------------------------------------------------------------------------------------
# report


def _markdown(report: dict) -> str:
    machine, q, s = report["machine"], report["quality"], report["speed"]
    lines = [
        "# Decoder LLM benchmark", "",
        f"`{report['command']}` on {machine['cpu']} ({machine['cores']} cores; torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}; ORT CPU provider), {report['date_utc']} UTC.", "",
        "## Quality: trained tiny_lm (real weights)", "",
        f"Character-level Llama, {q['model']['parameters']:,} parameters ({q['model']['layers']} layers x "
        f"{q['model']['hidden']}, tied embeddings), trained {q['model']['trained_steps']} steps "
        f"({q['model']['train_seconds']} s) on pydoc_data.topics; held-out perplexity of the transformers model "
        f"{q['ppl_transformers']:.4f} (chance {q['chance_ppl']}) over {q['ppl_tokens']:,} held-out tokens. "
        f"Perplexity in ONNX Runtime. GPTQ calibrates on {q['calibration']['prompts']} windows of the training text; "
        "the rows \"calibration set 2, 3\" are `int4-weights` on other windows (seeds "
        f"{', '.join(map(str, q['calibration']['seeds'][1:]))}), the spread of its result. Greedy: 64 new tokens after "
        f"each of {q['greedy_prompts']} held-out prompts, against transformers' generate (fp32): tokens equal before "
        "the first difference (mean), and the prompts where all 64 are equal.", "",
        "| variant | perplexity | rise vs fp32 | file (KB) | size vs fp32 | greedy agreement /64 | all 64 equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in q["rows"]:
        lines.append(f"| {row['variant']} | {row['ppl']:.4f} | {row['ppl_rise_pct']:+.3f}% | {row['bytes'] / 1e3:.0f} | "
                     f"{row['size_vs_fp32']:.3f}x | {row['greedy_agree_64']:.1f} | "
                     f"{row['greedy_all_64']}/{q['greedy_prompts']} |")
    labels = list(s["shapes"][0]["ms"])
    fp32 = "fp32"
    lines += [
        "", "## Speed: random-weight Llama", "",
        f"{s['model']['layers']} layers x {s['model']['hidden']}, vocab {s['model']['vocab']}, "
        f"{s['model']['parameters'] / 1e6:.1f}M parameters. Median ms per step (interleaved rounds x runs per variant: "
        f"{' x '.join(map(str, s['timing']['one token']))} for one-token steps, "
        f"{' x '.join(map(str, s['timing']['longer']))} for longer ones); in brackets the speed-up over fp32. Decode: one token per row after a "
        f"{DECODE_PAST}-token cache; prefill: the prompt with an empty cache.", "",
        "| step | batch | tokens | " + " | ".join(labels) + " | fastest |",
        "|---|---|---|" + "---|" * len(labels) + "---|",
    ]
    for row in s["shapes"]:
        base = row["ms"][fp32]
        cells = [f"{ms:.2f} ({base / ms:.2f}x)" for ms in row["ms"].values()]
        lines.append(f"| {row['kind']} | {row['batch']} | {row['tokens']} | " + " | ".join(cells) + f" | {row['fastest']} |")
    decode = next(r for r in s["shapes"] if r["kind"] == "decode" and r["batch"] == 1)
    lines += ["", "Decode tokens/s at batch 1 (cache of 128): " +
              ", ".join(f"{label} {1000 / ms:.1f}" for label, ms in decode["ms"].items()) + ".", "",
              "Files (MB): " + ", ".join(f"{label} {b / 1e6:.1f} ({b / s['bytes'][fp32]:.3f}x)"
                                          for label, b in s["bytes"].items()) + ".", "",
              f"What `int4-weights` chose per graph: {s['graphs_chosen']}. End to end with fxcompress.generate "
              f"({s['generate']['prompt']}-token prompt, {s['generate']['new_tokens']} new tokens, batch 1), median seconds of {s['generate']['runs']} interleaved runs:", "",
              "| graphs | seconds |", "|---|---|"]
    for label, seconds in s["generate"]["seconds"].items():
        lines.append(f"| {label} | {seconds:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one round: a dry run of every step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for decoder.md / .json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # ORT's quantizers log every initializer otherwise
    with tempfile.TemporaryDirectory() as folder:
        quality_part = quality(Path(folder), args.quick)
        for path in Path(folder).iterdir():
            path.unlink()
        speed_part = speed(Path(folder), args.quick)
    report = {"command": command_line(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "machine": machine_description("cpu"), "quick": args.quick, "quality": quality_part, "speed": speed_part}
    write_results(args.out, "decoder", report, _markdown(report))
    return report


if __name__ == "__main__":
    main()
