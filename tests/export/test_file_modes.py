"""Files fxcompress writes get the mode an ordinary ``open()`` gives under the caller's umask.

The atomic writer creates its temporary file with ``tempfile.mkstemp`` (always 0600) and renames
it into place; without a chmod a deployed model would be readable only by whoever compiled it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
import pytest

from fxcompress.cli import main
from fxcompress.errors import ExportError
from fxcompress.export.atomic import current_umask, ordinary_file_mode, write_atomically


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_current_umask_and_ordinary_mode(umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    assert ordinary_file_mode() == expected


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_write_matches_plain_open(umask, tmp_path, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    written = write_atomically(tmp_path / "atomic.txt", lambda p: p.write_text("x"))
    assert mode_of(written) == mode_of(plain) == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_cli_compile_writes_onnx_and_report_with_umask_modes(umask, tmp_path, capsys, mask):
    umask(mask)
    out, report = tmp_path / "m.onnx", tmp_path / "r.html"
    assert main(["compile", "tests.models:conv_bn_relu", "--out", str(out), "--report", str(report),
                 "--no-baseline", "--runs", "4"]) == 0
    capsys.readouterr()
    onnx.checker.check_model(onnx.load(str(out)))
    assert mode_of(out) == 0o666 & ~mask
    assert mode_of(report) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.html"]  # no temporary file left


def test_failed_write_under_open_umask_leaves_nothing(umask, tmp_path):
    umask(0o022)

    def broken(path: Path) -> None:
        path.write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportError, match="nothing was written"):
        write_atomically(tmp_path / "m.onnx", broken)
    assert list(tmp_path.iterdir()) == []
