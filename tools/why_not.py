"""Where each rule matched but declined to rewrite, and why: ``fxcompress diff --passes SPEC --why-not`` (python tools/why_not.py SPEC [--recipe R])."""
import sys; sys.path.insert(0, "")  # noqa: E702 - package.module:function specs import from the current folder
from fxcompress.cli import main
sys.exit(main(["diff", "--why-not", "--passes", *sys.argv[1:]]))
