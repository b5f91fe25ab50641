"""Write files atomically: a failure leaves no partial file and never clobbers a good one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from fxcompress.errors import ExportError


def check_output_path(path: str | os.PathLike) -> Path:
    """Validate that ``path`` can be written: its folder exists and is writable, it is not a folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"Output path {path} is a directory.", "give a file name such as model.onnx.")
    if not parent.is_dir():
        raise ExportError(f"Output folder {parent} does not exist.", f"create it first (mkdir -p {parent}) or choose another path.")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Output folder {parent} is not writable.", "choose a folder you can write to.")
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    Whatever ``write`` raises propagates after the temporary file is removed.
    """
    path = check_output_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
