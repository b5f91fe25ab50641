#!/usr/bin/env python
"""Print why each fusion rule did not fire where its pattern matched ("why didn't it fuse?").

    python tools/why_not.py torchvision:mobilenet_v2 --recipe default

For every rule with near-misses: the layer, node and the reason the rule's check gave. Uses the
public API only: fxcompress.compile and fxcompress.inspect.why_not.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.getcwd())  # so package.module:function specs from the current project import
    import fxcompress
    from fxcompress.errors import FxCompressError
    from fxcompress.inspect.render_text import render_near_misses, use_color
    from fxcompress.inspect.why_not import why_not
    from fxcompress.loading import load_model, parse_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="torchvision:NAME, package.module:function or file.pt2")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--input-shape", action="append", default=None)
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.spec, [parse_shape(s) for s in args.input_shape] if args.input_shape else None)
        result = fxcompress.compile(loaded.model, loaded.example_inputs, args.recipe)
    except FxCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_near_misses(why_not(result), color=use_color(sys.stdout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
