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
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"Output folder {parent} is a file, not a folder.", "choose an output path inside a folder.")
    if not parent.is_dir():
        raise ExportError(f"Output folder {parent} does not exist.", f"create it first (mkdir -p {parent}) or choose another path.")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Output folder {parent} is not writable.", "choose a folder you can write to.")
    # os.access says yes to root everywhere, and pseudo or read-only file systems (/proc, a
    # read-only mount) only refuse at creation time: probe with the same kind of file we write.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"Output folder {parent} is not writable ({exc.strerror or exc}).",
                          "choose a folder you can write to.") from None
    return path


def current_umask() -> int:
    """The process's file-creation mask, read without changing it where the kernel tells it."""
    try:  # Linux >= 4.7 reports it; os.umask() can only be read by setting it, racing other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file under the caller's umask."""
    return 0o666 & ~current_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    The file gets the mode an ordinary ``open()`` would give it under the caller's umask
    (``tempfile.mkstemp`` alone makes it 0600, unreadable to a service account or a colleague).
    Whatever ``write`` raises propagates after the temporary file is removed (an OSError —
    disk full, folder gone — as an ExportError).
    """
    path = check_output_path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise ExportError(f"Cannot create a file in {path.parent} ({exc.strerror or exc}).", "choose a folder you can write to.") from None
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, ordinary_file_mode())
        finally:
            os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, the folder vanished: nothing partial is left behind
        tmp.unlink(missing_ok=True)
        raise ExportError(f"Writing {path} failed ({exc.strerror or exc}); nothing was written.",
                          "free disk space or choose another folder, then export again.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
