"""Structured pruning and sparsity: fxcompress vs Torch-Pruning, side by side in one process.

    python benchmarks/pruning.py                     # ResNet-50, 10 rounds
    python benchmarks/pruning.py --rounds 3 --quick  # fewer timing rounds, no training-step timing

On ResNet-50 (batch 1, 224x224, batch norms given realistic statistics): the plain fp32 export;
Torch-Pruning (DepGraph MagnitudePruner, L1 importance, pruning_ratio=0.5, last linear ignored,
then the same plain export); fxcompress ``prune`` at ratio 0.5; fxcompress ``prune`` then
``int8``; ORT's ``quantize_static`` (U8S8, per-channel QDQ) on the dense model. MACs are counted
by one counter (fxcompress.analysis.macs on the captured graph) for every variant; Torch-Pruning's
own counter is shown beside it. Latency: ORT CPU provider, timed interleaved (docs/design.md). Also:
one training step (SGD, batch 8) of the pruned module vs the original, and unstructured 80%
magnitude sparsity (file sizes dense / baked / compact encodings, ORT parity). And where the int8
time goes: prune+int8 vs dense ORT int8 timed again at one thread, and ORT's profiler per op type
at both thread counts (fxcompress.runtime.profiling), which shows why 0.26x the multiply-adds
does not give 0.26x the latency.

Writes benchmarks/results/pruning.md and .json with the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import fxcompress  # noqa: E402
from fxcompress.passes.presets import prune as prune_preset, sparse as sparse_preset  # noqa: E402
from fxcompress.runtime.profiling import op_times  # noqa: E402
from fxcompress.runtime.session import create_session  # noqa: E402
from fxcompress.runtime.timing import make_runner, time_interleaved  # noqa: E402


def _torch_pruning(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float) -> tuple[torch.nn.Module, dict]:
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(pruned, example_inputs=inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[pruned.fc])
    pruner.step()
    seconds = time.perf_counter() - start
    macs, params = tp.utils.count_ops_and_params(pruned, inputs)
    return pruned.eval(), {"seconds": seconds, "tp_macs": int(macs), "tp_params": int(params), "version": tp.__version__}


def _train_step_runner(module: torch.nn.Module, batch: tuple[torch.Tensor, ...], labels: torch.Tensor):
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(module(*batch), labels).backward()
        optimizer.step()

    return step


INT8_PAIR = ("ORT quantize_static U8S8 (dense)", "fxcompress prune 0.5 + int8")


def _int8_breakdown(paths: dict[str, Path], inputs: tuple[torch.Tensor, ...], rounds: int) -> dict:
    """Where the int8 time goes, dense ORT int8 vs prune+int8, at one thread and at ORT's default.

    Latency at one thread is timed interleaved without the profiler (the profiler inflates every
    kernel a little); the per-op-type kernel times, keyed by thread setting then variant, come
    from separate profiled sessions.
    """
    one_thread = {label: create_session(str(paths[label]), "cpu", optimize=True, threads=1) for label in INT8_PAIR}
    latency_1 = time_interleaved({label: make_runner(rt, inputs) for label, rt in one_thread.items()}, rounds=rounds)
    profiles = {key: {label: op_times(paths[label], inputs, runs=20, warmup=5, threads=threads).to_dict() for label in INT8_PAIR}
                for key, threads in (("default", None), ("1", 1))}
    return {"p50_ms_1_thread": {label: v["p50_ms"] for label, v in latency_1.items()}, "op_times": profiles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="skip the training-step timing")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = common._torchvision("resnet50")(1)
    calibration = [common._image_input()(1) for _ in range(16)]
    work = Path(tempfile.mkdtemp(prefix="fxc-prune-"))
    rows: dict[str, dict] = {}

    dense_path = common.export_plain(model, inputs, work / "dense.onnx")
    rows["fp32 (plain export)"] = {"macs": common.count_macs(model, inputs), "bytes": dense_path.stat().st_size}

    tp_model, tp_info = _torch_pruning(model, inputs, args.ratio)
    tp_path = common.export_plain(tp_model, inputs, work / "tp.onnx")
    rows["Torch-Pruning 0.5"] = {"macs": common.count_macs(tp_model, inputs), "bytes": tp_path.stat().st_size, **tp_info}

    recipe = prune_preset().set_options("prune-channels", {"ratio": args.ratio})
    start = time.perf_counter()
    with common.quiet():
        pruned = fxcompress.compile(model, inputs, recipe=recipe)
    seconds = time.perf_counter() - start
    stats = next(r.stats for r in pruned.report.records if r.name == "prune-channels")
    ours_path = pruned.export_onnx(work / "ours.onnx", tolerance=1e-4)
    rows["fxcompress prune 0.5"] = {"macs": stats["macs_after"], "bytes": ours_path.stat().st_size, "seconds": seconds,
                                    "params": stats["params_after"], "parity_vs_module": pruned.report.parity.drift,
                                    "skipped_groups": stats["skipped"]}

    with common.quiet():
        pruned_int8 = fxcompress.compile(pruned.module, inputs, recipe="int8", calibration=calibration)
    int8_path = pruned_int8.export_onnx(work / "ours_int8.onnx")
    # counted on the int8 graph: its stem runs as space-to-depth, whose zero taps are multiply-adds too
    rows["fxcompress prune 0.5 + int8"] = {"macs": common.count_macs(pruned_int8.module, inputs), "bytes": int8_path.stat().st_size}
    ort_int8_path = common.quantize_ort_static(dense_path, work / "ort_int8.onnx", calibration)
    rows["ORT quantize_static U8S8 (dense)"] = {"macs": rows["fp32 (plain export)"]["macs"], "bytes": ort_int8_path.stat().st_size}

    paths = {"fp32 (plain export)": dense_path, "Torch-Pruning 0.5": tp_path, "fxcompress prune 0.5": ours_path,
             "fxcompress prune 0.5 + int8": int8_path, "ORT quantize_static U8S8 (dense)": ort_int8_path}
    runtimes = {label: create_session(str(path), "cpu", optimize=True) for label, path in paths.items()}
    runners = {label: make_runner(rt, inputs) for label, rt in runtimes.items()}
    latency = time_interleaved(runners, rounds=args.rounds)
    for label, stats_ms in latency.items():
        rows[label]["p50_ms"] = stats_ms["p50_ms"]
        rows[label]["provider"] = runtimes[label].provider
    dense_ms = rows["fp32 (plain export)"]["p50_ms"]
    for row in rows.values():
        row["speedup_vs_fp32"] = dense_ms / row["p50_ms"]
    breakdown = _int8_breakdown(paths, inputs, rounds=max(2, args.rounds // 2))

    # Unstructured magnitude sparsity: file size and parity.
    recipe = sparse_preset().set_options("sparsify-magnitude", {"sparsity": args.sparsity})
    with common.quiet():
        sparse = fxcompress.compile(model, inputs, recipe=recipe)
    baked_path = sparse.export_onnx(work / "sparse_baked.onnx", tolerance=1e-4)
    compact_path = sparse.export_onnx(work / "sparse_compact.onnx", tolerance=1e-4, sparse=True)
    compact_parity = sparse.report.parity
    sparse_rt = {"dense": create_session(str(dense_path), "cpu", optimize=True),
                 "sparse compact": create_session(str(compact_path), "cpu", optimize=True)}
    sparse_latency = time_interleaved({k: make_runner(v, inputs) for k, v in sparse_rt.items()}, rounds=max(2, args.rounds // 2))
    sparsity_row = {
        "sparsity": args.sparsity,
        "dense_bytes": dense_path.stat().st_size,
        "baked_bytes": baked_path.stat().st_size,
        "compact_bytes": compact_path.stat().st_size,
        "smaller": dense_path.stat().st_size / compact_path.stat().st_size,
        "parity_drift": compact_parity.drift,
        "parity_passed": compact_parity.passed,
        "p50_ms_dense": sparse_latency["dense"]["p50_ms"],
        "p50_ms_compact": sparse_latency["sparse compact"]["p50_ms"],
    }

    training = None
    if not args.quick:
        batch = (torch.randn(8, 3, 224, 224),)
        labels = torch.randint(0, 1000, (8,))
        original = copy.deepcopy(model)
        steps = {"original (eager)": _train_step_runner(original, batch, labels),
                 "pruned result.module": _train_step_runner(pruned.module, batch, labels)}
        training = time_interleaved(steps, rounds=3, block=2, warmup=1, batch_size=8)

    result = {"command": common.command_line(), "machine": common.machine_description("cpu"), "model": "resnet50",
              "ratio": args.ratio, "rows": rows, "int8_breakdown": breakdown, "sparsity": sparsity_row,
              "training_step_ms": training}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Structured pruning and sparsity (ResNet-50, batch 1, ORT CPU)", "",
             f"Command: `{result['command']}`  ", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; git {m['git']}; {m['date']}", "",
             "| variant | GMACs (one counter) | p50 ms | x vs fp32 | file MB | notes |", "|---|---|---|---|---|---|"]
    for label, row in result["rows"].items():
        notes = []
        if "tp_macs" in row:
            notes.append(f"Torch-Pruning's own counter {row['tp_macs'] / 1e9:.2f} GMACs, v{row['version']}")
        if "parity_vs_module" in row:
            notes.append(f"ORT parity vs module {row['parity_vs_module']:.1e}, {len(row['skipped_groups'])} group(s) skipped")
        macs = f"{row['macs'] / 1e9:.3f}" if row.get("macs") else "-"
        lines.append(f"| {label} | {macs} | {row['p50_ms']:.2f} | {row['speedup_vs_fp32']:.2f} | "
                     f"{row['bytes'] / 1e6:.1f} | {'; '.join(notes)} |")
    rows = result["rows"]
    lines += ["", f"prune+int8 / ORT int8 (dense) latency: "
              f"{rows['fxcompress prune 0.5 + int8']['p50_ms'] / rows['ORT quantize_static U8S8 (dense)']['p50_ms']:.2f}"]
    lines += _breakdown_markdown(result)
    s = result["sparsity"]
    lines += ["", f"## Unstructured magnitude sparsity {s['sparsity']:.0%}", "",
              f"dense {s['dense_bytes'] / 1e6:.1f} MB, masks baked {s['baked_bytes'] / 1e6:.1f} MB, compact encoding "
              f"{s['compact_bytes'] / 1e6:.1f} MB: **{s['smaller']:.2f}x smaller**; ORT parity drift {s['parity_drift']:.1e} "
              f"({'pass' if s['parity_passed'] else 'FAIL'}); p50 dense {s['p50_ms_dense']:.2f} ms vs compact "
              f"{s['p50_ms_compact']:.2f} ms (ORT folds the decoders at load)."]
    if result["training_step_ms"]:
        t = result["training_step_ms"]
        lines += ["", "## One training step (SGD, batch 8, torch eager, interleaved)", ""]
        lines += [f"- {label}: p50 {v['p50_ms']:.0f} ms" for label, v in t.items()]
    lines += ["", "Figures from a shared 2-core machine: comparisons are interleaved in one process, so ratios hold; "
              "absolute numbers move with the load of other jobs."]
    return "\n".join(lines) + "\n"


def _breakdown_markdown(result: dict) -> list[str]:
    rows, breakdown = result["rows"], result["int8_breakdown"]
    dense, pruned = INT8_PAIR
    one = breakdown["p50_ms_1_thread"]
    profiles = breakdown["op_times"]
    lines = ["", "## Where the int8 time goes (dense ORT int8 vs prune 0.5 + int8)", "",
             "| threads | ORT int8 dense p50 ms | prune+int8 p50 ms | ratio | kernel sum dense / pruned ms (profiler) |",
             "|---|---|---|---|---|"]
    for label, key, dense_ms, pruned_ms in (("default (one per core)", "default", rows[dense]["p50_ms"], rows[pruned]["p50_ms"]),
                                            ("1", "1", one[dense], one[pruned])):
        kernels = f"{profiles[key][dense]['total_ms']:.2f} / {profiles[key][pruned]['total_ms']:.2f}"
        lines.append(f"| {label} | {dense_ms:.2f} | {pruned_ms:.2f} | {pruned_ms / dense_ms:.2f} | {kernels} |")
    macs = rows[pruned]["macs"] / rows[dense]["macs"]
    lines += ["", f"Multiply-adds of prune+int8 / dense: {macs:.2f}. Per op type, ORT's default threads, kernel ms per run "
              "(nodes); the last column is how much faster the op type got with the second thread:", "",
              "| op type | ORT int8 dense | prune+int8 | pruned / dense | 2-thread speedup dense / pruned |", "|---|---|---|---|---|"]
    dense_ops, pruned_ops = profiles["default"][dense]["ops"], profiles["default"][pruned]["ops"]
    dense_1, pruned_1 = profiles["1"][dense]["ops"], profiles["1"][pruned]["ops"]

    def cell(ops: dict, op: str) -> str:
        return f"{ops[op]['ms']:.3f} ({ops[op]['nodes']})" if op in ops else "-"

    def speedup(single: dict, multi: dict, op: str) -> str:
        return f"{single[op]['ms'] / multi[op]['ms']:.2f}" if op in single and op in multi and multi[op]["ms"] else "-"

    def largest(op: str) -> float:
        return max(dense_ops.get(op, {}).get("ms", 0), pruned_ops.get(op, {}).get("ms", 0))

    for op in sorted(set(dense_ops) | set(pruned_ops), key=largest, reverse=True):
        ratio = f"{pruned_ops[op]['ms'] / dense_ops[op]['ms']:.2f}" if op in dense_ops and op in pruned_ops else "-"
        lines.append(f"| {op} | {cell(dense_ops, op)} | {cell(pruned_ops, op)} | {ratio} | "
                     f"{speedup(dense_1, dense_ops, op)} / {speedup(pruned_1, pruned_ops, op)} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
