"""Compile time and memory against graph size: does `fxcompress.compile` stay linear?

A deep, narrow CNN of N conv layers (conv -> batch norm -> relu, a residual add every two layers;
4 channels at 4x4 so arithmetic is negligible and the graph is what costs) is compiled with the
``default`` preset for each N. Every size runs in a fresh subprocess, so its peak RSS is its own.
Reported per size: graph nodes, capture seconds, compile seconds (capture included), the slowest
passes, peak RSS growth over the process's baseline, and the scaling exponent between consecutive
sizes (log t2/t1 / log n2/n1: 1.0 is linear, 2.0 quadratic).

    python benchmarks/scaling.py                      # 125 250 500 1000 layers
    python benchmarks/scaling.py --layers 50 100 --out /tmp/scaling.md
    python benchmarks/scaling.py --per-pass           # plus each default pass alone, per size

Results go to benchmarks/results/scaling.md with the command and the machine. A 2-core machine
shared with other jobs is noisy: read the exponents, not the third digit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(layers: int):
    import torch
    from torch import nn

    class Deep(nn.Module):
        def __init__(self, n: int, c: int = 4) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(n))
            self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(n))

        def forward(self, x):
            skip = x
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                x = torch.relu(bn(conv(x)))
                if i % 2 == 1:
                    x = x + skip
                    skip = x
            return x.mean((2, 3))

    torch.manual_seed(0)
    model = Deep(layers).eval()
    for bn in model.bns:  # non-trivial stats so folding does real work
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.8, 1.2)
    return model, (torch.randn(1, 4, 4, 4),)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_passes_alone(graph, repeats: int = 2) -> dict[str, float]:
    """Each pass of the default preset alone on a copy of ``graph``: best of ``repeats`` seconds."""
    import copy

    from fxcompress.infra.registry import create_pass
    from fxcompress.passes.presets import PRESETS

    best = {}
    for step in PRESETS["default"]().steps:
        times = []
        for _ in range(repeats):
            work, p = copy.deepcopy(graph), create_pass(step.name, step.options)
            start = time.perf_counter()
            p(work)
            times.append(time.perf_counter() - start)
        best[step.name] = min(times)
    return best


def worker(layers: int, per_pass: bool = False) -> dict:
    """Measure one size in this (fresh) process."""
    warnings.simplefilter("ignore")
    import torch

    import fxcompress
    from fxcompress.capture import capture

    # The model's arithmetic is negligible; one thread keeps OpenMP spin contention on a shared
    # machine out of what is meant to measure graph handling.
    torch.set_num_threads(1)

    model, inputs = build(layers)
    capture(*build(2))  # warm torch.export's caches on a tiny model first
    baseline = _rss_mb()
    start = time.perf_counter()
    graph = capture(model, inputs)
    capture_s = time.perf_counter() - start
    nodes = len(graph.graph.nodes)
    alone = time_passes_alone(graph) if per_pass else {}
    del graph
    start = time.perf_counter()
    result = fxcompress.compile(model, inputs, "default")
    compile_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    per_pass: dict[str, float] = {}
    for record in result.report.records:
        per_pass[record.name] = per_pass.get(record.name, 0.0) + (record.seconds or 0.0)
    return {
        "layers": layers, "nodes": nodes, "nodes_after": len(result.module.graph.nodes),
        "capture_s": capture_s, "compile_s": compile_s, "passes_s": sum(per_pass.values()),
        "slowest": sorted(per_pass.items(), key=lambda kv: -kv[1])[:3],
        "peak_rss_growth_mb": peak - baseline, "drift": result.report.drift, "alone": alone,
    }


def _exponent(a: dict, b: dict, key: str) -> float:
    return math.log(b[key] / a[key]) / math.log(b["nodes"] / a["nodes"]) if a[key] > 0 and b[key] > 0 else float("nan")


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    import torch

    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
            f"Python {platform.python_version()}, torch {torch.__version__}; load average at start "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared machine)")


def render(rows: list[dict], command: str, machine: str) -> str:
    lines = [
        "# Compile time and memory vs graph size",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Model: N x (conv3x3 -> batch norm -> relu), residual add every 2 layers, 4 channels, 4x4 input; "
        "`fxcompress.compile(model, x, \"default\")`, each size in a fresh process, torch on 1 thread.",
        "Exponent = log(t2/t1) / log(nodes2/nodes1) against the previous row (1.0 = linear, 2.0 = quadratic).",
        "",
        "| layers | graph nodes | capture s | compile s | passes s | compile exp. | passes exp. | peak RSS growth MB | slowest passes (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(rows):
        prev = rows[i - 1] if i else None
        exp_c = f"{_exponent(prev, r, 'compile_s'):.2f}" if prev else "-"
        exp_p = f"{_exponent(prev, r, 'passes_s'):.2f}" if prev else "-"
        slow = ", ".join(f"{n} {s:.2f}" for n, s in r["slowest"])
        lines.append(f"| {r['layers']} | {r['nodes']} | {r['capture_s']:.2f} | {r['compile_s']:.2f} | {r['passes_s']:.2f} | "
                     f"{exp_c} | {exp_p} | {r['peak_rss_growth_mb']:.0f} | {slow} |")
    if rows and rows[0]["alone"]:
        names = list(rows[0]["alone"])
        lines += ["", "Each pass alone on the captured graph (best of 2, seconds; exponent vs the previous row):", "",
                  "| pass | " + " | ".join(f"{r['layers']} layers" for r in rows) + " |",
                  "|---|" + "---:|" * len(rows)]
        for name in names:
            cells = []
            for i, r in enumerate(rows):
                t = r["alone"][name]
                exp = ""
                if i and rows[i - 1]["alone"][name] > 1e-3 and t > 1e-3:
                    exp = f" ({math.log(t / rows[i - 1]['alone'][name]) / math.log(r['nodes'] / rows[i - 1]['nodes']):.2f})"
                cells.append(f"{t:.3f}{exp}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[125, 250, 500, 1000])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.md"))
    parser.add_argument("--per-pass", action="store_true", help="also time each default pass alone per size")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.per_pass)))
        return 0
    machine = _machine()
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n in args.layers:
        cmd = [sys.executable, __file__, "--worker", str(n)] + (["--per-pass"] if args.per_pass else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{n} layers: {rows[-1]['nodes']} nodes, compile {rows[-1]['compile_s']:.2f} s, "
              f"peak RSS +{rows[-1]['peak_rss_growth_mb']:.0f} MB", flush=True)
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(rows, command, machine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
