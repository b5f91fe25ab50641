"""Structural reparameterization: fxcompress `default` against timm's `reparameterize_model`.

For MobileOne-S0, RepVGG-A0 and FastViT-T8 (timm architectures, random weights with batch-norm
statistics measured on random images and perturbed affine parameters, so no branch is zero), three
ONNX files of the same weights are timed interleaved in one process on ONNX Runtime:

- ``plain``: ``torch.onnx.export`` of the training-time (multi-branch) model;
- ``fxcompress default``: the `default` preset (fold-batchnorm, then merge-parallel-convs, ...);
- ``timm reparameterize``: timm's own deploy conversion of a copy, then the plain export.

Each file's parity against the PyTorch model is reported, and the ratio of fxcompress's latency to
the peer's (goal: at most 1.05). The zoo check then times plain vs `default` on the image models of
benchmarks/common.py and counts what merge-parallel-convs merged there, to show `default` is
never slower than plain export.

    python benchmarks/reparameterization.py            # full run, results in benchmarks/results/
    python benchmarks/reparameterization.py --quick --out /tmp/reparam   # CI's dry run (small)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODELS, calibrate_batchnorm, command_line, export_plain, machine_description, quiet  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402

REPARAM_MODELS = ["mobileone_s0", "repvgg_a0", "fastvit_t8"]
ZOO_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3", "efficientnet_b0", "convnext_t"]


def build_timm(name: str, size: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name)
    calibrate_batchnorm(model, lambda batch: (torch.randn(batch, 3, size, size),))
    torch.manual_seed(1)
    return model.eval(), (torch.randn(1, 3, size, size),)


def _merged(result) -> int:
    return sum(r.stats.get("merged", 0) for r in result.report.records if r.name == "merge-parallel-convs")


def _parity(session, model, inputs) -> dict[str, float]:
    with torch.no_grad():
        reference = model(*inputs).numpy()
    got = session.session.run(None, session.feeds(inputs))[0]
    error = float(np.abs(got - reference).max())
    return {"max_abs": error, "relative": error / float(np.abs(reference).max())}


def _time(files: dict[str, Path], model, inputs, rounds: int, block: int) -> dict[str, dict]:
    sessions = {label: create_session(path, "cpu") for label, path in files.items()}
    stats = time_interleaved({label: make_runner(s, inputs) for label, s in sessions.items()}, rounds=rounds, block=block)
    return {label: {"p50_ms": stats[label]["p50_ms"], "p90_ms": stats[label]["p90_ms"],
                    "size_bytes": path.stat().st_size, "provider": sessions[label].provider,
                    **_parity(sessions[label], model, inputs)} for label, path in files.items()}


def reparameterizable(name: str, size: int, work: Path, rounds: int, block: int) -> dict:
    from timm.utils.model import reparameterize_model

    model, inputs = build_timm(name, size)
    with quiet():
        result = fxcompress.compile(model, inputs, "default")
        files = {
            "plain": export_plain(model, inputs, work / f"{name}_plain.onnx"),
            "fxcompress default": result.export_onnx(work / f"{name}_default.onnx"),
            "timm reparameterize": export_plain(reparameterize_model(copy.deepcopy(model)), inputs, work / f"{name}_timm.onnx"),
        }
    variants = _time(files, model, inputs, rounds, block)
    return {"model": name, "input": list(inputs[0].shape), "merged": _merged(result), "variants": variants,
            "default_vs_peer": variants["fxcompress default"]["p50_ms"] / variants["timm reparameterize"]["p50_ms"],
            "plain_vs_default": variants["plain"]["p50_ms"] / variants["fxcompress default"]["p50_ms"]}


def zoo(name: str, work: Path, rounds: int, block: int) -> dict:
    model, inputs = MODELS[name].build(1)
    with quiet():
        result = fxcompress.compile(model, inputs, "default")
        files = {"plain": export_plain(model, inputs, work / f"{name}_plain.onnx"),
                 "fxcompress default": result.export_onnx(work / f"{name}_default.onnx")}
    variants = _time(files, model, inputs, rounds, block)
    return {"model": name, "merged": _merged(result), "variants": variants,
            "default_vs_plain": variants["fxcompress default"]["p50_ms"] / variants["plain"]["p50_ms"]}


def render(data: dict) -> str:
    lines = ["# Structural reparameterization: fxcompress `default` vs timm `reparameterize_model`", "",
             f"Command: `{data['command']}`  ", f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, "
             f"ONNX Runtime {data['machine']['onnxruntime']}, provider used: cpu; git {data['machine']['git']}, {data['machine']['date']}.",
             "", "Random weights; batch-norm statistics measured on random images, affine parameters perturbed (no branch is zero). "
             "Latency p50 in ms, batch 1, all variants of a model timed interleaved in one process.", "",
             "| model | input | merged | plain ms | fxcompress default ms | timm reparameterize ms | default / peer | "
             "plain / default | parity default (rel) | parity peer (rel) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["reparameterizable"]:
        v = row["variants"]
        lines.append(f"| {row['model']} | {'x'.join(map(str, row['input'][1:]))} | {row['merged']} | {v['plain']['p50_ms']:.2f} | "
                     f"{v['fxcompress default']['p50_ms']:.2f} | {v['timm reparameterize']['p50_ms']:.2f} | "
                     f"{row['default_vs_peer']:.3f} | {row['plain_vs_default']:.2f}x | "
                     f"{v['fxcompress default']['relative']:.1e} | {v['timm reparameterize']['relative']:.1e} |")
    lines += ["", "## The zoo: `default` vs plain export (224x224, batch 1)", "",
              "| model | merged | plain ms | default ms | default / plain |", "|---|---|---|---|---|"]
    for row in data["zoo"]:
        v = row["variants"]
        lines.append(f"| {row['model']} | {row['merged']} | {v['plain']['p50_ms']:.2f} | {v['fxcompress default']['p50_ms']:.2f} | "
                     f"{row['default_vs_plain']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="RepVGG-A0 at 64x64 and one zoo model, few runs (CI's dry run)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12, quick 2)")
    parser.add_argument("--block", type=int, default=8, help="timed runs per variant per round")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for the .json/.md")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 12)
    models = ["repvgg_a0"] if args.quick else REPARAM_MODELS
    zoo_models = ["resnet18"] if args.quick else ZOO_MODELS
    size = 64 if args.quick else 224
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description("cpu")  # at the start: the revision whose code runs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for name in models:
            rows.append(reparameterizable(name, size, work, rounds, args.block))
            print(f"{name}: default/peer {rows[-1]['default_vs_peer']:.3f}, plain/default {rows[-1]['plain_vs_default']:.2f}x", flush=True)
        zoo_rows = []
        for name in zoo_models:
            zoo_rows.append(zoo(name, work, rounds, args.block))
            print(f"{name}: default/plain {zoo_rows[-1]['default_vs_plain']:.3f} (merged {zoo_rows[-1]['merged']})", flush=True)
    data = {"command": command_line(), "machine": machine, "reparameterizable": rows, "zoo": zoo_rows}
    (out / "reparameterization.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "reparameterization.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
