"""Compile cost as the model grows: wall time and peak resident memory of compile + export.

Each (model, tool, preset) runs in a fresh process; its peak is the kernel's own count (VmHWM),
given above the process's baseline (after importing torch, transformers, fxcompress and ONNX
Runtime, before the model is built: so the model's own weights are counted) and as a multiple of
the fp32 weight bytes (docs/design.md decision 11; target <= 3x). Beside fxcompress: plain
``torch.onnx.export`` of the same module, and onnxruntime-genai's model builder (int4, reading a
``save_pretrained`` folder with a small tokenizer built here, no downloads).

    python benchmarks/scaling_memory.py                 # every size (needs most of 24 GB; run under flock)
    python benchmarks/scaling_memory.py --sizes 87M     # some sizes
    python benchmarks/scaling_memory.py --quick         # a tiny decoder, two tools: a check that it runs
    python benchmarks/scaling_memory.py --sizes 0.55B-bf16   # the decoder built in bfloat16 (as checkpoints load)

Writes benchmarks/results/scaling_memory.md and .json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (layers, hidden, heads, kv heads, MLP width, vocabulary)
DECODERS = {
    "tiny": (2, 64, 4, 4, 128, 512),
    "87M": (6, 768, 12, 12, 2048, 32000),
    "246M": (16, 1024, 16, 16, 2816, 32000),
    "0.55B": (20, 1536, 24, 24, 4096, 32000),
    "1.1B": (22, 2048, 32, 4, 5632, 32000),
}
VISION = {"ViT-B": "vit_b_16", "ViT-L": "vit_l_16"}
#: A size name with this suffix ("0.55B-bf16") is that decoder cast to bfloat16, as checkpoints are
#: published and loaded (``torch_dtype=torch.bfloat16``); the multiples stay of the fp32 bytes.
HALF_SUFFIXES = {"-bf16": "bfloat16", "-fp16": "float16"}
DECODER_PRESETS = ["default", "int8-dynamic", "int4-weights"]
VISION_PRESETS = ["default", "int8"]


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def _split_dtype(name: str) -> tuple[str, str | None]:
    """``("0.55B", "bfloat16")`` for "0.55B-bf16"; ``(name, None)`` for an fp32 size."""
    for suffix, dtype in HALF_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], dtype
    return name, None


def _llama(name: str, seed: int = 0):
    import torch
    import transformers

    name, dtype = _split_dtype(name)
    layers, hidden, heads, kv, mlp, vocab = DECODERS[name]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if dtype is None:
        return transformers.LlamaForCausalLM(config).eval()
    # built in the half dtype directly: an fp32 model cast afterwards would count 4 bytes a weight in the peak
    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(before)


def _save_hf_folder(model, folder: Path) -> None:
    """``save_pretrained`` plus a small word-level tokenizer over the model's vocabulary (genai's builder wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    vocab["<unk>"] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="t1", eos_token="t2").save_pretrained(folder)


def worker(model_name: str, tool: str, preset: str) -> dict:
    """One measurement in this (fresh) process."""
    import torch  # noqa: F401 - imported before the baseline, as every tool needs it
    import transformers  # noqa: F401
    import onnxruntime  # noqa: F401
    import fxcompress

    baseline = hwm()
    folder = Path(tempfile.mkdtemp(prefix="fxc-scaling-"))
    if model_name in VISION:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, VISION[model_name])().eval()
        inputs = (torch.randn(1, 3, 224, 224),)
    else:
        model = _llama(model_name)
        inputs = None
    weights = sum(p.numel() * 4 for p in model.parameters())
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    start = time.perf_counter()
    stages = {}
    if tool == "fxcompress":
        if inputs is None:
            # random weights: the drift gate is not what this measures (benchmarks/decoder.py has the fidelity)
            result = fxcompress.compile_decoder(model, preset, tolerance=float("inf"))
        else:
            calibration = [(torch.randn(1, 3, 224, 224),) for _ in range(4)] if preset == "int8" else None
            result = fxcompress.compile(model, inputs, preset, calibration, tolerance=1.0 if preset == "int8" else None)
        result.export_onnx(folder / "model.onnx")
        stages = dict(result.report.stages)
    elif tool == "torch.onnx.export":
        from fxcompress.capture_decoder import DecoderModule, decoder_spec, dynamic_shapes, example_inputs

        if inputs is None:
            spec = decoder_spec(model)
            module, inputs, shapes = DecoderModule(model, spec.layers), example_inputs(spec), dynamic_shapes(spec)
        else:
            module, shapes = model, None
        torch.onnx.export(module, inputs, str(folder / "model.onnx"), dynamo=True, dynamic_shapes=shapes,
                          external_data=weights > 1.8e9)
    elif tool == "genai-builder":
        _save_hf_folder(model, folder / "hf")
        del model
        start = time.perf_counter()  # the folder is the builder's input: its writing is not its cost
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder / "hf"), "-o",
                        str(folder / "out"), "-p", "int4", "-e", "cpu"], check=True, capture_output=True)
    else:
        raise SystemExit(f"unknown tool {tool}")
    seconds = time.perf_counter() - start
    peak = hwm()
    if tool == "genai-builder":  # it ran in a child process: its peak (it imports what this baseline holds)
        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"model": model_name, "tool": tool, "preset": preset, "weights_bytes": weights, "stored_bytes": stored, "seconds": seconds,
            "baseline_bytes": baseline, "peak_bytes": peak, "stages": stages}


def run_one(model_name: str, tool: str, preset: str, timeout: float) -> dict:
    """``worker`` in a fresh interpreter; a failure is recorded, not raised."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", model_name, tool, preset],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"model": model_name, "tool": tool, "preset": preset, "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"model": model_name, "tool": tool, "preset": preset,
                "error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(sizes: list[str], quick: bool) -> list[tuple[str, str, str]]:
    if quick:
        return [("tiny", "fxcompress", "default"), ("tiny", "torch.onnx.export", "-")]
    runs = []
    for size in sizes:
        if size in VISION:
            runs += [(size, "fxcompress", p) for p in VISION_PRESETS] + [(size, "torch.onnx.export", "-")]
        else:
            runs += [(size, "fxcompress", p) for p in DECODER_PRESETS]
            runs += [(size, "torch.onnx.export", "-"), (size, "genai-builder", "int4")]
    return runs


def table(rows: list[dict]) -> str:
    lines = ["| model | fp32 weights | tool | preset | wall s | peak above baseline | x weights | where the time went |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['tool']} | {r['preset']} | failed: {r['error']} | | | |")
            continue
        above = r["peak_bytes"] - r["baseline_bytes"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if v >= 0.5)
        stored = r.get("stored_bytes", r["weights_bytes"])  # a -bf16 size: also the multiple of what it holds
        of_stored = f" ({above / stored:.1f}x as stored)" if stored != r["weights_bytes"] else ""
        lines.append(f"| {r['model']} | {r['weights_bytes'] / 1e9:.2f} GB | {r['tool']} | {r['preset']} | {r['seconds']:.1f} | "
                     f"{above / 1e9:.2f} GB | {above / r['weights_bytes']:.1f}{of_stored} | {stages} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=[*list(DECODERS)[1:], *VISION])
    parser.add_argument("--tools", nargs="*", default=None, help="only these tools (fxcompress, torch.onnx.export, genai-builder)")
    parser.add_argument("--presets", nargs="*", default=None, help="only these fxcompress presets")
    parser.add_argument("--quick", action="store_true", help="a tiny decoder through fxcompress and torch.onnx.export")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scaling_memory")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    runs = [r for r in plan(args.sizes, args.quick)
            if (args.tools is None or r[1] in args.tools) and (args.presets is None or r[1] != "fxcompress" or r[2] in args.presets)]
    rows = []
    for run in runs:
        rows.append(run_one(*run, timeout=args.timeout))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = "python benchmarks/scaling_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    text = (f"# Compile cost as the model grows\n\nCommand: `{command.strip()}`  \nDate: {datetime.date.today()}  \n"
            f"Machine: {machine} (shared with other jobs while measured)\n\n"
            "Each row a fresh process; peak = VmHWM above the baseline after imports (the model's own weights counted); "
            "stages in seconds from CompileReport.stages.\n\n" + table(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
