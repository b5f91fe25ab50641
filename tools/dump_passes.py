#!/usr/bin/env python
"""Dump every pass of a recipe to numbered files, for developers writing or debugging passes.

    python tools/dump_passes.py torchvision:resnet18 --recipe default --out-dir out/passes

Writes into OUT_DIR, numbered in the order the graph changed (000 is the captured graph):
  NNN_<pass>.txt        the graph and generated code after the pass (DumpIR instrument)
  NNN_<pass>.diff.txt   what the pass changed, grouped by layer
  NNN_<pass>.dot        the graph with the pass's changes highlighted (.dot.svg if Graphviz is installed)
  report.html           the compile report (timeline, diffs, histograms, near-misses)
Only the public API is used: fxcompress.compile, CompileResult.snapshots, fxcompress.inspect.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.getcwd())  # so package.module:function specs from the current project import
    import fxcompress
    from fxcompress.errors import FxCompressError
    from fxcompress.analysis.graph_diff import diff_snapshots
    from fxcompress.inspect.render_dot import snapshot_dot, to_svg
    from fxcompress.inspect.render_html import write_report
    from fxcompress.inspect.render_text import render_graph_diff
    from fxcompress.loading import load_model, parse_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="torchvision:NAME, package.module:function or file.pt2")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--out-dir", default="out/passes")
    parser.add_argument("--input-shape", action="append", default=None)
    args = parser.parse_args(argv)
    try:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        loaded = load_model(args.spec, [parse_shape(s) for s in args.input_shape] if args.input_shape else None)
        result = fxcompress.compile(loaded.model, loaded.example_inputs, args.recipe,
                                    options=fxcompress.CompileOptions(dump_dir=out))
        snaps = result.snapshots.snapshots
        for index in range(1, len(snaps)):
            before, after = snaps[index - 1], snaps[index]
            stem = out / f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', after.label)}"
            diff = diff_snapshots(before, after)
            Path(f"{stem}.diff.txt").write_text(render_graph_diff(diff) + "\n")
            dot = snapshot_dot(after, diff, before)
            Path(f"{stem}.dot").write_text(dot)
            svg = to_svg(dot)
            if svg is not None:
                Path(f"{stem}.dot.svg").write_text(svg)
            print(f"{stem.name}: {diff.to_text()}")
        write_report(out / "report.html", result)
        print(f"Wrote {len(snaps) - 1} pass diffs and report.html to {out}")
    except FxCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
