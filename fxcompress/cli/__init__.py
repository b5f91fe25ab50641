"""The ``fxcompress`` command line: parses arguments, calls the Python API, prints.

``main`` is the console script's entry point (``fxcompress = "fxcompress.cli:main"``).
"""

from fxcompress.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
