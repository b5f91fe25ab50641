"""Terminal styling shared by every text rendering of inspection results (diffs, model info, near-misses).

Colour (red removed, green added, yellow changed) is used only when the stream is a terminal and
``NO_COLOR`` is not set, so piped output and files stay plain text. The reports render themselves
(``ModelInfo.to_text``) and ``render_text`` renders the diffs; both style through here, so neither
imports the other.
"""

from __future__ import annotations

import os
import sys
from typing import IO

_CODES = {"removed": "31", "added": "32", "changed": "33", "head": "1", "dim": "2"}


def use_color(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (stdout by default) is a terminal and NO_COLOR is unset."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


class Style:
    """``style(text, kind)``: ``text`` in the colour of ``kind`` (removed, added, changed, head, dim), or as is."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, kind: str) -> str:
        return f"\033[{_CODES[kind]}m{text}\033[0m" if self.color else text
