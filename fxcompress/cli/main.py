"""Command line: ``fxcompress compile | generate | bench | diff | inspect | sweep | passes | demo``.

Errors the user can fix are printed as one paragraph (no stack trace) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from fxcompress.errors import FxCompressError
from fxcompress.cli.compile_command import (
    add_compile_parser, add_generate_parser, add_runs_option, cmd_compile, cmd_generate,
)
from fxcompress.cli.inspect_commands import add_diff_parser, add_inspect_parser, cmd_diff, cmd_inspect


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time an ONNX model in ONNX Runtime")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--input-shape", action="append", default=None, help="override input shapes (default: from the file)")
    p.add_argument("--warmup", type=int, default=10)
    add_runs_option(p, 100, "timed runs")
    p.add_argument("--ops", action="store_true", help="also print ORT's kernel time per op type (from its profiler)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads for --ops (default: one per core)")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="compile many models x recipes as isolated trials: a resumable log and a table")
    p.add_argument("specs", nargs="*", help="model SPECs as for compile (torchvision:NAME, package.module:function, ...)")
    p.add_argument("--specs-file", default=None, help="a file listing one SPEC per line (# comments)")
    p.add_argument("--recipe", dest="recipes", action="append", default=None,
                   help="preset name or TOML recipe path; repeat for several (default: default)")
    p.add_argument("--log", required=True, help="JSON-lines results log; a rerun skips the trials already in it")
    p.add_argument("--table", action="append", default=None, help="write the table here (.md or .html); repeatable")
    p.add_argument("--workers", type=int, default=0, help="run each trial in its own process, N at a time (default 0: in this process)")
    p.add_argument("--ray", default=None, metavar="auto|HOST:PORT", help="run trials as Ray tasks: a local instance or a cluster")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (--ray auto)")
    p.add_argument("--memory-gb", type=float, default=None, help="address-space cap per trial (needs --workers or --ray)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per trial (needs --workers or --ray)")
    p.add_argument("--benchmark", action="store_true", help="also time each result vs the plain export (trials run alone)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ORT provider for --benchmark")
    add_runs_option(p, 48, "timed runs per variant with --benchmark")
    p.add_argument("--input-shape", action="append", default=None, help="input shape for every spec, like 1,3,224,224")
    p.add_argument("--calibration", default=None, help="an image folder, a .txt/.jsonl file, a datasets folder, .pt/.npz, "
                                                       "random:N, or package.module:function (every spec)")
    p.add_argument("--retry-failed", action="store_true", help="rerun logged trials that did not end ok")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import this module first (it registers your own passes); repeat for several")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description="Graph-level compiler passes for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compile_parser(sub)
    add_generate_parser(sub)
    _add_bench(sub)
    add_diff_parser(sub)
    add_inspect_parser(sub)
    _add_sweep(sub)
    passes = sub.add_parser("passes", help="list registered passes, their options and the presets")
    passes.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                        help="import this module first, so that the passes it registers are listed too")
    demo = sub.add_parser("demo", help="train a digits CNN, compile it with every preset, compare accuracy/size/latency")
    demo.add_argument("--out-dir", default="out", help="where the ONNX files go (default: out/)")
    demo.add_argument("--epochs", type=int, default=8)
    return parser


def _shapes(values: Sequence[str] | None):
    from fxcompress.loading import parse_shape

    return [parse_shape(v) for v in values] if values else None


def _import_user_modules(args: argparse.Namespace) -> None:
    from fxcompress.infra.recipe import import_modules

    if args.imports:
        import_modules(args.imports, "--import")


def cmd_bench(args: argparse.Namespace) -> int:
    from fxcompress.export.onnx_export import load_onnx
    from fxcompress.loading import onnx_inputs
    from fxcompress.runtime.timing import benchmark

    model = load_onnx(args.model)
    inputs = onnx_inputs(model, _shapes(args.input_shape))
    report = benchmark(model, inputs, provider=args.provider, warmup=args.warmup, runs=args.runs)
    print(f"{args.model}: {report.to_text()}")
    if args.ops:
        from fxcompress.runtime.profiling import op_times

        print(op_times(model, inputs, args.provider, runs=max(1, args.runs // 5), threads=args.threads).to_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fxcompress.errors import InputError
    from fxcompress.sweeps import SweepOptions, sweep
    from fxcompress.sweeps.trials import read_spec_file

    _import_user_modules(args)
    specs = list(args.specs) + (read_spec_file(args.specs_file) if args.specs_file else [])
    if not specs:
        raise InputError("fxcompress sweep was given no model specs.", "list SPECs on the command line or give --specs-file FILE.")
    options = SweepOptions(ray=args.ray, ray_cpus=args.ray_cpus, memory_gb=args.memory_gb, time_limit=args.time_limit,
                           provider=args.provider, runs=args.runs, input_shapes=_shapes(args.input_shape))
    result = sweep(specs, args.recipes or ["default"], log=args.log, table=args.table, workers=args.workers,
                   calibration=args.calibration, benchmark=args.benchmark, retry_failed=args.retry_failed, options=options)
    print(result.markdown())
    print(f"Ran {result.ran} trial(s) ({result.executor}), skipped {result.skipped} already in {result.log}.")
    for path in result.tables:
        print(f"Wrote {path}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    _import_user_modules(args)
    from fxcompress.infra.pass_base import option_help
    from fxcompress.infra.registry import available_passes
    from fxcompress.passes.presets import PRESETS

    for name, cls in available_passes().items():
        kind = "lossless" if cls.lossless else "lossy"
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}  [{kind}]  {doc}")
        for opt, type_name, default, help_text in option_help(cls.Options):
            print(f"    {opt} ({type_name}, default {default!r}): {help_text}")
    print("\nPresets:")
    for name, factory in PRESETS.items():
        recipe = factory()
        print(f"  {name}: {' -> '.join(s.name for s in recipe.steps)}  ({recipe.description})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fxcompress.examples.digits import run_demo

    return run_demo(Path(args.out_dir), epochs=args.epochs)


COMMANDS = {"compile": cmd_compile, "bench": cmd_bench, "passes": cmd_passes, "demo": cmd_demo, "diff": cmd_diff, "inspect": cmd_inspect,
            "sweep": cmd_sweep, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxcompress`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return COMMANDS[args.command](args)
    except FxCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
