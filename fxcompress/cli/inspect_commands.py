"""The ``fxcompress diff`` and ``fxcompress inspect`` commands (parsers and handlers).

Kept beside the inspection code so cli.py only wires them in. Errors are FxCompressError
subclasses, which the CLI prints as one paragraph with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from fxcompress.errors import InputError


def add_diff_parser(sub: Any) -> None:
    p = sub.add_parser("diff", help="diff two ONNX files, or two passes of a compile run (--passes SPEC)",
                       description="fxcompress diff A.onnx B.onnx | fxcompress diff --passes SPEC --recipe R [--from PASS] [--to PASS] "
                                   "[--why-not] [--dump-dir DIR]")
    p.add_argument("a", nargs="?", help="the ONNX file before")
    p.add_argument("b", nargs="?", help="the ONNX file after")
    p.add_argument("--passes", metavar="SPEC", default=None,
                   help="compile this model (torchvision:NAME, package.module:function, file.pt2) and diff two of its passes")
    p.add_argument("--recipe", default="default", help="recipe for --passes (default: default)")
    p.add_argument("--from", dest="from_pass", default="captured",
                   help="graph after this pass ('captured': before any pass; default)")
    p.add_argument("--to", dest="to_pass", default=None, help="graph after this pass (default: the final graph)")
    p.add_argument("--only", metavar="PASS", default=None, help="show what this one pass changed (its input vs its output)")
    p.add_argument("--input-shape", action="append", default=None, help="input shape like 1,3,224,224 (repeat per input)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs code from the file)")
    p.add_argument("--html", default=None, help="also write a self-contained HTML page of the diff")
    p.add_argument("--dot", default=None, help="also write a Graphviz DOT picture (and PATH.svg when `dot` is installed)")
    p.add_argument("--why-not", action="store_true",
                   help="with --passes: also print where rules matched but declined to rewrite, and why")
    p.add_argument("--dump-dir", default=None, metavar="DIR",
                   help="with --passes: write every pass to DIR, numbered in the order the graph changed: its graph "
                        "(NNN_<pass>.txt), what it changed (.diff.txt), a DOT picture (.dot, .dot.svg with Graphviz), "
                        "and the compile report (report.html)")


def add_inspect_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="op histogram, parameters, MACs, size, quantized/sparse share, opset, providers")
    p.add_argument("model", help="an .onnx file, an output folder (compile --out DIR/), or a model spec (torchvision:NAME, package.module:function, file.pt2)")
    p.add_argument("--input-shape", action="append", default=None, help="input shape for a model spec (repeat per input)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs code from the file)")
    p.add_argument("--no-providers", action="store_true", help="skip creating a session per execution provider")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _shapes(values: Sequence[str] | None):
    from fxcompress.loading import parse_shape

    return [parse_shape(v) for v in values] if values else None


def _positions(result: Any) -> list[tuple[int, int]]:
    """For each pass record, the indices of the snapshots of the graph before and after it."""
    snaps = result.snapshots.snapshots
    current, j, out = 0, 1, []
    for record in result.report.records:
        before = current
        if j < len(snaps) and snaps[j].label == record.name and (record.modified or record.rolled_back):
            if record.modified:  # a rolled-back pass left a snapshot of a graph that was discarded
                current = j
            j += 1
        out.append((before, current))
    return out


def pass_snapshots(result: Any, label: str) -> tuple[Any, Any]:
    """Snapshots of the graph before and after pass ``label`` ('captured': the captured graph twice).

    When a recipe iterates, the pass's last run that changed the graph is meant (or its first
    run if it never changed anything). A pass that changed nothing has no snapshot of its own:
    the graph after it is the one after the last pass before it that did change something.
    """
    snaps = result.snapshots.snapshots
    if label == "captured":
        return snaps[0], snaps[0]
    chosen = None
    for record, position in zip(result.report.records, _positions(result)):
        if record.name == label or record.name.endswith("/" + label):
            if chosen is None or record.modified:
                chosen = position
    if chosen is None:
        names = ", ".join(dict.fromkeys(r.name for r in result.report.records)) or "none"
        raise InputError(f"The recipe ran no pass named '{label}'.", f"use 'captured' or one of the passes it ran: {names}.")
    return snaps[chosen[0]], snaps[chosen[1]]


def _write_extras(args: argparse.Namespace, diff: Any, dot_text: str) -> None:
    from fxcompress.inspect.render_dot import to_svg
    from fxcompress.inspect.render_html import render_diff_html, write_text

    if args.html:
        print(f"Wrote {write_text(args.html, render_diff_html(diff))}")
    if args.dot:
        print(f"Wrote {write_text(args.dot, dot_text)}")
        svg = to_svg(dot_text)
        if svg is None:
            print("Graphviz `dot` is not installed (or failed): SVG skipped; render the .dot file elsewhere.")
        else:
            print(f"Wrote {write_text(Path(str(args.dot) + '.svg'), svg)}")


def cmd_diff(args: argparse.Namespace) -> int:
    from fxcompress.export.atomic import check_output_path
    from fxcompress.inspect.render_text import render_graph_diff, render_onnx_diff
    from fxcompress.inspect.text_style import use_color

    for path in (args.html, args.dot):
        if path:
            check_output_path(path)
    color = use_color(sys.stdout)
    if not args.passes and (args.why_not or args.dump_dir):
        raise InputError("--why-not and --dump-dir describe the passes of a compile run, so they need --passes SPEC.",
                         "run fxcompress diff --passes SPEC --recipe R --why-not (or --dump-dir DIR).")
    if args.passes:
        if args.a or args.b:
            raise InputError("Give either two ONNX files or --passes SPEC, not both.",
                             "fxcompress diff A.onnx B.onnx, or fxcompress diff --passes torchvision:resnet18 --recipe default.")
        from fxcompress.api import CompileOptions, compile as compile_model
        from fxcompress.analysis.graph_diff import diff_snapshots
        from fxcompress.inspect.render_dot import snapshot_dot
        from fxcompress.loading import load_model

        loaded = load_model(args.passes, _shapes(args.input_shape), trust_pickle=args.trust_pickle)
        result = compile_model(loaded.model, loaded.example_inputs, args.recipe,
                               options=CompileOptions(dump_dir=args.dump_dir))
        print(f"Passes of recipe '{result.recipe.name}' on {loaded.description}:")
        for i, r in enumerate(result.report.records, 1):
            what = f"ROLLED BACK: {r.rolled_back}" if r.rolled_back else r.extra["diff"].to_text() if "diff" in r.extra else "no change"
            print(f"  {i:>2}. {r.name:<32} {what}")
        if args.only:
            before, after = pass_snapshots(result, args.only)
        else:
            before = pass_snapshots(result, args.from_pass)[1]
            after = pass_snapshots(result, args.to_pass)[1] if args.to_pass else result.snapshots.snapshots[-1]
        diff = diff_snapshots(before, after)
        print()
        print(render_graph_diff(diff, color=color))
        _write_extras(args, diff, snapshot_dot(after, diff, before) if args.dot else "")
        if args.why_not:
            from fxcompress.inspect.render_text import render_near_misses
            from fxcompress.inspect.why_not import why_not

            print("\nWhy not (rules that matched but declined):\n" + render_near_misses(why_not(result), color=color))
        if args.dump_dir:
            _dump_passes(result, Path(args.dump_dir))
        return 0
    if not (args.a and args.b):
        raise InputError("fxcompress diff needs two ONNX files (or --passes SPEC).",
                         "run fxcompress diff before.onnx after.onnx, or fxcompress diff --passes SPEC --recipe R.")
    from fxcompress.inspect.onnx_diff import diff_onnx
    from fxcompress.inspect.onnx_graph import OnnxGraph, read_model
    from fxcompress.inspect.render_dot import onnx_dot

    diff = diff_onnx(args.a, args.b)
    print(render_onnx_diff(diff, color=color))
    dot_text = onnx_dot(OnnxGraph(read_model(args.b)[0]), diff) if args.dot else ""
    _write_extras(args, diff, dot_text)
    return 0


def _dump_passes(result: Any, folder: Path) -> None:
    """Beside the graphs compile's DumpIR wrote (NNN_<pass>.txt), each changed pass's diff and DOT
    picture under the same number, and the HTML compile report."""
    from fxcompress.analysis.graph_diff import diff_snapshots
    from fxcompress.infra.instruments import safe_filename
    from fxcompress.inspect.render_dot import snapshot_dot, to_svg
    from fxcompress.inspect.render_html import write_report, write_text
    from fxcompress.inspect.render_text import render_graph_diff

    snaps = result.snapshots.snapshots
    for index in range(1, len(snaps)):
        before, after = snaps[index - 1], snaps[index]
        stem = folder / f"{index:03d}_{safe_filename(after.label)}"
        diff = diff_snapshots(before, after)
        write_text(f"{stem}.diff.txt", render_graph_diff(diff) + "\n")
        dot = snapshot_dot(after, diff, before)
        write_text(f"{stem}.dot", dot)
        svg = to_svg(dot)
        if svg is not None:
            write_text(f"{stem}.dot.svg", svg)
    write_report(folder / "report.html", result)
    print(f"\nWrote {len(snaps) - 1} pass graphs, diffs and DOT pictures, and report.html, to {folder}")


def _looks_like_onnx(spec: str) -> bool:
    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        return True
    # An existing file that is not a torch archive or pickle is given to the ONNX reader, which
    # explains clearly if it is not ONNX either.
    return path.is_file() and path.suffix.lower() not in (".pt", ".pt2", ".pth")


def cmd_inspect(args: argparse.Namespace) -> int:
    from fxcompress.inspect.model_info import inspect_graph_module, inspect_onnx
    from fxcompress.inspect.text_style import use_color

    if Path(args.model).is_dir():  # an output folder of fxcompress compile --out DIR/
        from fxcompress.output_folder import read_manifest, render_manifest

        manifest = read_manifest(args.model)
        infos = {name: inspect_onnx(Path(args.model) / graph["file"], check_providers=not args.no_providers)
                 for name, graph in manifest.get("graphs", {}).items()}
        if args.json:
            print(json.dumps({"manifest": manifest, "graphs": {k: v.to_dict() for k, v in infos.items()}}, indent=2, default=str))
        else:
            print(render_manifest(manifest))
            for name, info in infos.items():
                print(f"\n{name}:\n" + info.to_text(color=use_color(sys.stdout)))
        return 0
    if _looks_like_onnx(args.model):
        info = inspect_onnx(args.model, check_providers=not args.no_providers)
    else:
        from fxcompress.capture import capture
        from fxcompress.loading import load_model

        loaded = load_model(args.model, _shapes(args.input_shape), trust_pickle=args.trust_pickle)
        info = inspect_graph_module(capture(loaded.model, loaded.example_inputs), loaded.description)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, default=str))
    else:
        print(info.to_text(color=use_color(sys.stdout)))
    return 0
