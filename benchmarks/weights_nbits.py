"""Weight-only int4/int8 (``int4-weights`` / ``int8-weights``) against ORT's MatMulNBitsQuantizer.

    python benchmarks/weights_nbits.py --quick        # small models, short training (minutes on 2 cores)
    python benchmarks/weights_nbits.py                # larger

Two measurements, on models built here (no downloads):

1. **Quality**: a tiny byte-level Llama (tied embedding / lm_head) is trained for a few hundred
   steps on this Python installation's standard-library sources, then perplexity on held-out
   files is computed in ONNX Runtime for: the fp32 export, fxcompress int8-weights, int4-weights
   (GPTQ, 16 calibration sequences), int4 round-to-nearest, and ORT's MatMulNBitsQuantizer (RTN,
   its defaults: asymmetric, block 128; and block 32) applied to the fp32 export.
2. **Speed and size**: a larger random-init Llama captured at one token (what decoding runs per
   step, without the KV cache), timed interleaved (fxcompress.runtime.timing) in ORT: fp32,
   fxcompress int4 / int8 (RTN; GPTQ changes values, not kernels), ORT's int4 with
   accuracy_level=4. File sizes of each.

Timing runs must hold the machine's timing lock: ``flock /tmp/fxcompress-timing.lock python ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxcompress  # noqa: E402
from fxcompress.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import time_interleaved  # noqa: E402


def llama(vocab: int, hidden: int, layers: int, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config)


def corpus(limit_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out bytes: the standard library's sources (sorted, so the split is reproducible)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:limit_bytes]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.9)
    return tokens[:split], tokens[split:]


def windows(tokens: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length - 1, (count,), generator=g)
    return torch.stack([tokens[s:s + length + 1] for s in starts])


def train(model, data: torch.Tensor, steps: int, length: int) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        batch = windows(data, length, 8, step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"  step {step}: loss {float(loss.detach()):.3f}", flush=True)
    model.eval()


def perplexity(session, batches: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in batches:
        logits = torch.from_numpy(session.run([row[None, :-1]])[0])
        total += float(torch.nn.functional.cross_entropy(logits[0], row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(total / count)


def ort_rtn(fp32_path: Path, out: Path, block_size: int, accuracy_level: int | None) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul", "Gather"))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def quality(tmp: Path, quick: bool, only: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    model = llama(256, 128 if quick else 256, 2 if quick else 4)
    train_text, test_text = corpus(2_000_000 if quick else 8_000_000)
    length = 64
    print("training", flush=True)
    start = time.time()
    train(model, train_text, 200 if quick else 1500, length)
    trained_s = time.time() - start
    held_out = windows(test_text, length, 32 if quick else 128, 12345)
    calibration = [(row[None, :-1],) for row in windows(train_text, length, 16, 777)]
    example = calibration[0]
    variants = {
        "fp32": "default",
        "fxcompress int8-weights": "int8-weights",
        "fxcompress int4-weights (GPTQ)": "int4-weights",
        "fxcompress int4 RTN": ["quantize-weights"],
        "fxcompress int4 GPTQ, accuracy_level=0": [QuantizeWeightsPass(method="gptq", accuracy_level=0)],
        "fxcompress int4 GPTQ block 32": [QuantizeWeightsPass(method="gptq", block_size=32)],
        "fxcompress int4 GPTQ block 128": [QuantizeWeightsPass(method="gptq", block_size=128)],
        "fxcompress int4 RTN block 128": [QuantizeWeightsPass(block_size=128)],
        "fxcompress int4 GPTQ block 64": [QuantizeWeightsPass(method="gptq", block_size=64)],
        "fxcompress int4 GPTQ block 128, lm_head int8": [QuantizeWeightsPass(method="gptq", block_size=128, lm_head="int8")],
        "fxcompress int4 GPTQ block 64, lm_head int8": [QuantizeWeightsPass(method="gptq", block_size=64, lm_head="int8")],
    }
    if only:
        variants = {k: v for k, v in variants.items() if k == "fp32" or any(o in k for o in only)}
    rows = {}
    for label, recipe in variants.items():
        result = fxcompress.compile(model, example, recipe, calibration=calibration, tolerance=10.0)
        path = result.export_onnx(tmp / f"q_{len(rows)}.onnx")
        rows[label] = {"ppl": perplexity(create_session(path, "cpu"), held_out), "bytes": path.stat().st_size}
        print(f"  {label}: {rows[label]}", flush=True)
    fp32 = tmp / "q_0.onnx"
    for block in () if only else (128, 32):
        path = ort_rtn(fp32, tmp / f"ort_{block}.onnx", block, 4)
        label = f"ORT MatMulNBitsQuantizer RTN int4 block {block}"
        rows[label] = {"ppl": perplexity(create_session(path, "cpu"), held_out), "bytes": path.stat().st_size}
        print(f"  {label}: {rows[label]}", flush=True)
    base = rows["fp32"]["ppl"]
    for row in rows.values():
        row["ppl_rise"] = row["ppl"] / base - 1
    return {"train_seconds": trained_s, "rows": rows}


def speed(tmp: Path, quick: bool) -> dict:
    torch.manual_seed(0)
    hidden, layers, vocab = (512, 2, 4096) if quick else (1024, 4, 8192)
    model = llama(vocab, hidden, layers, heads=8).eval()
    token = torch.randint(0, vocab, (1, 1))
    paths = {}
    for label, recipe in {"fp32": "default", "fxcompress int4 (acc 4)": ["quantize-weights"],
                          "fxcompress int8 (acc 4)": [QuantizeWeightsPass(bits=8)]}.items():
        result = fxcompress.compile(model, (token,), recipe, tolerance=10.0)
        paths[label] = result.export_onnx(tmp / f"s_{len(paths)}.onnx")
    paths["ORT int4 RTN block 32 (acc 4)"] = ort_rtn(paths["fp32"], tmp / "s_ort32.onnx", 32, 4)
    paths["ORT int4 RTN block 128 (acc 4)"] = ort_rtn(paths["fp32"], tmp / "s_ort128.onnx", 128, 4)
    sessions = {label: create_session(path, "cpu") for label, path in paths.items()}
    runners = {label: (lambda s=s: s.run([token])) for label, s in sessions.items()}
    stats = time_interleaved(runners, rounds=5 if quick else 10, block=10)
    rows = {label: {"p50_ms": stats[label]["p50_ms"], "bytes": paths[label].stat().st_size} for label in paths}
    base = rows["fp32"]
    for row in rows.values():
        row["speedup"] = base["p50_ms"] / row["p50_ms"]
        row["size_ratio"] = row["bytes"] / base["bytes"]
    return {"model": {"hidden": hidden, "layers": layers, "vocab": vocab}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--only", nargs="*", help="quality variants whose label contains one of these (and fp32)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quality:
            report["quality"] = quality(Path(tmp), args.quick, args.only)
        if not args.skip_speed:
            report["speed"] = speed(Path(tmp), args.quick)
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
