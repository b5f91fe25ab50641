"""The model sweeps' optional JSON-lines log (``FXCOMPRESS_SWEEP_LOG=path.jsonl``): one line per
model, appended as each model finishes, so a long sweep shows progress and can resume."""

from __future__ import annotations

import json
import os


def append(entry: dict) -> None:
    """Append ``entry`` as one line when FXCOMPRESS_SWEEP_LOG is set."""
    path = os.environ.get("FXCOMPRESS_SWEEP_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def read(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Entries logged in ``path`` (default: FXCOMPRESS_SWEEP_LOG), by their ``name``; a later line
    for a name wins. Empty without a log."""
    path = path or os.environ.get("FXCOMPRESS_SWEEP_LOG")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {entry["name"]: entry for entry in map(json.loads, filter(str.strip, f))}
