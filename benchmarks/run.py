"""One-command benchmark: every fxcompress preset against the toolchains a user would pick instead.

    python benchmarks/run.py                      # full CPU table -> benchmarks/results/
    python benchmarks/run.py --quick --out /tmp/b # tiny model, few runs (what CI dry-runs)
    python benchmarks/run.py --models resnet50 --resume   # one model; others kept from earlier runs
    python benchmarks/run.py --provider cuda --models resnet50 --batch 32 --torch-graphmodule

For each model (random weights, measured batch-norm statistics) the variants are: torch eager,
plain ``torch.onnx.export`` + ORT, onnxsim, ORT ``quantize_static`` (QDQ, per-channel, U8S8, MinMax,
16 random calibration inputs), ORT ``quantize_dynamic``, and every preset registered in
``fxcompress.passes.presets.PRESETS`` when the run starts. All variants of one model are timed
interleaved in one process (fxcompress.runtime.timing.time_interleaved), so machine drift
cancels. A variant that fails is a row with the reason, not a crash.

Each model's rows are written to ``<out>/models/<model>_b<batch>.json`` as soon as it is done;
``--resume`` skips models already there, and the summary files (results.json, results.md, the
latency-vs-size plot) are rebuilt from all per-model files after every model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import report  # noqa: E402

PEERS = {
    "eager": "torch eager",
    "plain": "torch.onnx.export",
    "onnxsim": "onnxsim",
    "ort-static": "ORT static int8",
    "ort-dynamic": "ORT dynamic int8",
}
#: Timing schedule per mode: rounds x (warm-up + block timed runs) per variant (docs/design.md).
SCHEDULES = {"full": dict(rounds=10, block=8, warmup=2), "quick": dict(rounds=2, block=2, warmup=1)}


@dataclass
class Variant:
    """One way of running the model: an ONNX file in ORT or a module in PyTorch."""

    label: str
    group: str  # "peer" or "fxcompress"
    engine: str  # "ort" or "torch"
    path: Path | None = None
    module: Any = None
    compile_s: float | None = None
    macs: int | None = None
    error: str | None = None
    row: dict[str, Any] = field(default_factory=dict)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def build_variants(spec: common.ModelSpec, model, inputs, calibration, presets, peers, work: Path,
                   torch_graphmodule: bool) -> list[Variant]:
    """Produce every artifact (ONNX files, compiled modules); failures become variants with an error."""
    import fxcompress

    base_macs = common.count_macs(model, inputs)
    variants: list[Variant] = []
    if "eager" in peers:
        variants.append(Variant(PEERS["eager"], "peer", "torch", module=model, macs=base_macs))
    plain = Variant(PEERS["plain"], "peer", "ort", macs=base_macs)
    try:
        plain.path, plain.compile_s = _timed(lambda: common.export_plain(model, inputs, work / "plain.onnx"))
    except Exception as exc:  # noqa: BLE001
        plain.error = common.first_line(exc)
    variants.append(plain)
    makers = {
        "onnxsim": lambda p: common.simplify_onnxsim(plain.path, p),
        "ort-static": lambda p: common.quantize_ort_static(plain.path, p, calibration),
        "ort-dynamic": lambda p: common.quantize_ort_dynamic(plain.path, p),
    }
    for key, make in makers.items():
        if key not in peers:
            continue
        variant = Variant(PEERS[key], "peer", "ort", macs=base_macs)
        if plain.error:
            variant.error = "needs the plain export, which failed"
        else:
            try:
                variant.path, seconds = _timed(lambda: make(work / f"{key}.onnx"))
                variant.compile_s = plain.compile_s + seconds  # a user pays for the export too
            except Exception as exc:  # noqa: BLE001
                variant.error = common.first_line(exc)
        variants.append(variant)
    jobs = [(name, name) for name in presets]
    for label, name in jobs:
        variant = Variant(f"fxcompress:{label}", "fxcompress", "ort")
        try:
            start = time.perf_counter()
            with common.quiet():
                result = fxcompress.compile(model, inputs, name, calibration=calibration)
                variant.path = result.export_onnx(work / f"preset-{re.sub(r'[^A-Za-z0-9.]+', '-', label)}.onnx")
            variant.compile_s = time.perf_counter() - start
            variant.macs = common.count_macs(result.module, inputs)
            if torch_graphmodule:
                variants.append(Variant(f"fxcompress:{name} (torch)", "fxcompress", "torch", module=result.module,
                                        compile_s=variant.compile_s, macs=variant.macs))
        except Exception as exc:  # noqa: BLE001 - FxCompressError or a bug: either way, a failed row
            variant.error = common.first_line(exc)
            if isinstance(exc, fxcompress.DriftError) and label == "int8":
                # What the refusal tells the user to do: keep the most sensitive layers in float.
                jobs.append((f"int8 max_drift={INT8_RETRY_MAX_DRIFT}", _int8_with_max_drift(INT8_RETRY_MAX_DRIFT)))
        variants.append(variant)
    return variants


#: The ``max_drift`` of the follow-up row when ``int8`` refuses a model for drifting past its tolerance.
INT8_RETRY_MAX_DRIFT = 0.1


def _int8_with_max_drift(max_drift: float):
    from fxcompress.passes.presets import int8

    return int8().set_options("quantize-int8", {"max_drift": max_drift})


def prepare_runners(variants: list[Variant], inputs, check_sets, reference, spec: common.ModelSpec,
                    provider: str, placement: bool) -> dict[str, Callable[[], Any]]:
    """Open sessions / place modules, check parity against eager fp32, try one run of each.

    Fills each variant's row with parity, size, provider (and node placement); a variant that
    fails here gets its error and no runner.
    """
    import onnx
    import torch

    from fxcompress.numerics import flatten_outputs
    from fxcompress.runtime.placement import node_placement
    from fxcompress.runtime.session import ProviderFallbackWarning, create_session
    from fxcompress.runtime.timing import make_runner, make_torch_runner

    device = "cuda" if provider == "cuda" else "cpu"
    runners: dict[str, Callable[[], Any]] = {}
    for v in variants:
        if v.error:
            continue
        try:
            if v.engine == "ort":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ProviderFallbackWarning)
                    runtime = create_session(v.path, provider)
                v.row["provider"] = runtime.provider
                v.row["fell_back"] = runtime.fell_back or any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
                v.row["size_mb"] = round(v.path.stat().st_size / 1e6, 3)
                v.row["onnx_nodes"] = len(onnx.load(str(v.path), load_external_data=False).graph.node)
                got = [runtime.run(feed) for feed in check_sets]
                v.row.update(common.parity(reference, got, spec.top1))
                if placement:
                    with warnings.catch_warnings():  # the fallback is already recorded in the row
                        warnings.simplefilter("ignore", ProviderFallbackWarning)
                        v.row["placement"] = node_placement(v.path, inputs, provider).to_dict()
                run = make_runner(runtime, inputs)
            else:
                if device == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError("PyTorch sees no CUDA device here")
                module = copy.deepcopy(v.module).to(device) if device != "cpu" else v.module
                v.row["provider"] = f"torch-{device}"
                v.row["fell_back"] = False
                with torch.inference_mode():
                    got = [flatten_outputs(module(*(t.to(device) for t in feed))) for feed in check_sets]
                v.row.update(common.parity(reference, got, spec.top1))
                run = make_torch_runner(module, inputs, device)
            run()  # a variant that cannot run fails here, not in the middle of the timing
            runners[v.label] = run
        except Exception as exc:  # noqa: BLE001
            v.error = common.first_line(exc)
    return runners


def run_model(name: str, batch: int, args: argparse.Namespace, presets: list[str]) -> dict[str, Any]:
    """Build, compile, check and time every variant of one model; returns its result record."""
    import torch

    from fxcompress.numerics import flatten_outputs
    from fxcompress.runtime.timing import time_interleaved

    spec = common.MODELS[name]
    schedule = dict(SCHEDULES["quick" if args.quick else "full"])
    schedule.update({k: getattr(args, k) for k in ("rounds", "block") if getattr(args, k) is not None})
    started = time.perf_counter()
    model, inputs = spec.build(batch)
    calibration = common.random_inputs(spec, inputs, 4 if args.quick else 16, seed=1)
    check_sets = [inputs, *common.random_inputs(spec, inputs, 1 if args.quick else 2, seed=2)]
    with torch.no_grad():
        reference = [flatten_outputs(model(*feed)) for feed in check_sets]
    placement = args.placement or args.provider == "cuda"
    with tempfile.TemporaryDirectory(prefix=f"fxc-bench-{name}-") as folder:
        variants = build_variants(spec, model, inputs, calibration, presets, args.peers, Path(folder),
                                  args.torch_graphmodule)
        runners = prepare_runners(variants, inputs, check_sets, reference, spec, args.provider, placement)
        print(f"  timing {len(runners)} variants interleaved: {schedule}", flush=True)
        # The machine's 1-minute load around the timing: interleaving cancels drift, not a machine
        # oversubscribed throughout, so a reader must be able to see how busy it was.
        load = [round(os.getloadavg()[0], 2)]
        timing = time_interleaved(runners, batch_size=batch, **schedule) if runners else {}
        load.append(round(os.getloadavg()[0], 2))
    base = timing.get(PEERS["plain"], {}).get("p50_ms")
    rows = []
    for v in variants:
        row = {"model": name, "batch": batch, "variant": v.label, "group": v.group, "engine": v.engine,
               "status": "failed" if v.error else "ok", "error": v.error, "compile_s": v.compile_s, "macs": v.macs,
               **v.row}
        stats = timing.get(v.label)
        if stats:
            row.update(p50_ms=stats["p50_ms"], p90_ms=stats["p90_ms"], throughput=stats["throughput"],
                       speedup=(base / stats["p50_ms"]) if base else None)
        rows.append(row)
    return {
        "model": name,
        "batch": batch,
        "provider_requested": args.provider,
        "schedule": schedule,
        "torch_threads": torch.get_num_threads(),
        "load_1min": load,
        "seconds": round(time.perf_counter() - started, 1),
        "command": common.command_line(),
        "machine": common.machine_description(),
        "rows": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated; default: the full set ({','.join(common.FULL_SET)}); "
                        f"--quick default: {','.join(common.QUICK_SET)}; also: {','.join(n for n, s in common.MODELS.items() if s.quick)}")
    parser.add_argument("--presets", default=None, help="comma-separated preset names (default: every registered preset; 'none' for peers only)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)} (plain is always run: it is the speedup base)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny model set, 4 calibration inputs, few timed runs (CI dry run)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (PyTorch variants use the matching device)")
    parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"), help="output folder (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true", help="skip models whose per-model result file already exists")
    parser.add_argument("--placement", action="store_true", help="record which provider ran each node (always on with --provider cuda)")
    parser.add_argument("--torch-graphmodule", action="store_true", help="also time each preset's compiled GraphModule in PyTorch")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the PyTorch variants "
                        "(default: torch's own; on a loaded machine OpenMP spinning can inflate eager timings badly)")
    parser.add_argument("--rounds", type=int, default=None, help="override the interleaving rounds")
    parser.add_argument("--block", type=int, default=None, help="override the timed runs per block")
    parser.add_argument("--render-only", action="store_true", help="only rebuild results.json/.md and the plot")
    args = parser.parse_args(argv)
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    if not peers <= set(PEERS):
        parser.error(f"unknown peer(s) {sorted(peers - set(PEERS))} in --peers; choose from {', '.join(PEERS)}")
    args.peers = [p for p in PEERS if p in peers | {"plain"}]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    if args.render_only:
        report.render(out)
        return 0
    from fxcompress.passes.presets import PRESETS

    models = [m.strip() for m in (args.models or ",".join(common.QUICK_SET if args.quick else common.FULL_SET)).split(",") if m.strip()]
    unknown = [m for m in models if m not in common.MODELS]
    if args.presets is None:
        presets = list(PRESETS)
    elif args.presets.strip() == "none":
        presets = []
    else:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    missing = [p for p in presets if p not in PRESETS]
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if unknown or missing or not batches or min(batches) < 1:
        problem = (f"unknown model(s) {unknown}; known: {', '.join(common.MODELS)}" if unknown else
                   f"unknown preset(s) {missing}; registered: {', '.join(PRESETS)}" if missing else
                   f"--batch must be positive integers, got {args.batch!r}")
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f"Benchmark on {args.provider}: models {models}, batch {batches}, presets {presets}, peers {args.peers}", flush=True)
    for name in models:
        for batch in batches:
            target = out / "models" / f"{name}_b{batch}.json"
            if args.resume and target.exists():
                print(f"{name} batch {batch}: kept from {target} (--resume)")
                continue
            print(f"{name} batch {batch}: building variants", flush=True)
            record = run_model(name, batch, args, presets)
            report.write_json(target, record)
            print(report.console_table(record["rows"]), flush=True)
            gc.collect()
            report.render(out)  # after every model, so an interrupted run still has its summary
    report.render(out)
    print(f"Results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
