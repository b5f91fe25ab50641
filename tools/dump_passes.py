"""Every pass of a recipe dumped to numbered files (graph, diff, DOT, report.html): ``fxcompress diff --passes SPEC --dump-dir DIR`` (python tools/dump_passes.py SPEC [--recipe R] [--dump-dir DIR], default out/passes)."""
import sys; sys.path.insert(0, "")  # noqa: E702 - package.module:function specs import from the current folder
from fxcompress.cli import main
sys.exit(main(["diff", "--dump-dir", "out/passes", "--passes", *sys.argv[1:]]))
