"""The one precheck of a model or data file before it is read: it exists, is a file, is not empty, is not absurdly large.

Every reader of a user's file (ONNX models, torch.export archives, pickled modules, calibration
tensors) calls :func:`check_model_file` first, so the same file gets the same answer, under one
size limit, whichever command reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fxcompress.errors import ModelFileError

#: Files larger than this are refused unless the caller raises the limit: a model file this big
#: is almost surely not what the user meant (an fp32 model of 2B parameters is 8 GB).
MAX_MODEL_FILE_BYTES = 8 * 1024**3


def check_model_file(path: str | os.PathLike, what: str = "Model file", *, max_bytes: int | None = None) -> Path:
    """Return ``path`` as a Path after checking that it can be read as a model file.

    Args:
        path: the file.
        what: how messages name it ("ONNX file", "Calibration file").
        max_bytes: the size limit; default :data:`MAX_MODEL_FILE_BYTES`.

    Raises:
        ModelFileError: the file is missing, a folder, empty, or over the limit; each names the fix.
    """
    path = Path(path)
    limit = MAX_MODEL_FILE_BYTES if max_bytes is None else max_bytes
    if not path.exists():
        raise ModelFileError(f"{what} {path} does not exist.", "check the path.")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file.", f"give the path of the {what.lower()} itself.")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{what} {path} is empty.", "the file was truncated: save or export it again.")
    if size > limit:
        raise ModelFileError(f"{what} {path} is {size / 1e9:.1f} GB, over the {limit / 1e9:.1f} GB limit.",
                             "check that this is the file you meant; if it is, raise max_bytes.")
    return path


__all__ = ["MAX_MODEL_FILE_BYTES", "check_model_file"]
