"""Settings shared by the model sweeps (tests/test_default_sweep.py, tests/test_prune_sweep.py).

``FXCOMPRESS_SWEEP_LOG=path.jsonl``: one line per model, appended as each model finishes, so a
long sweep shows progress and resumes. The default sweep runs through ``fxcompress.sweep``; pick
its executor with ``FXCOMPRESS_SWEEP_WORKERS=N`` (each model in its own capped process) or
``FXCOMPRESS_SWEEP_RAY=auto|HOST:PORT``; unset, models run in the test process, one by one.
"""

from __future__ import annotations

import json
import os

#: Per-model caps when the sweep runs in worker processes or on Ray. The memory cap is on address
#: space, not resident memory: 14 GiB stopped convnext_large (0.8 GB of weights) while deep-copying.
MEMORY_GB = 48
TIME_LIMIT = 1800


def path() -> str | None:
    """The log the sweeps append to (FXCOMPRESS_SWEEP_LOG), or None."""
    return os.environ.get("FXCOMPRESS_SWEEP_LOG") or None


def executor_options() -> dict:
    """``fxcompress.sweep`` keyword arguments for the executor the environment asks for."""
    from fxcompress import SweepOptions

    if os.environ.get("FXCOMPRESS_SWEEP_RAY"):
        return {"options": SweepOptions(ray=os.environ["FXCOMPRESS_SWEEP_RAY"], memory_gb=MEMORY_GB, time_limit=TIME_LIMIT)}
    workers = int(os.environ.get("FXCOMPRESS_SWEEP_WORKERS") or 0)
    return {"workers": workers, "options": SweepOptions(memory_gb=MEMORY_GB, time_limit=TIME_LIMIT)} if workers else {}


def append(entry: dict) -> None:
    """Append ``entry`` as one line when FXCOMPRESS_SWEEP_LOG is set."""
    if path():
        from fxcompress.sweeps.log import TrialLog

        TrialLog(path()).append({"key": entry["name"], **entry})


def read(log: str | os.PathLike | None = None) -> dict[str, dict]:
    """Entries logged in ``log`` (default: FXCOMPRESS_SWEEP_LOG) by model name (``name``, or the
    zoo name of a ``fxcompress sweep`` record's spec); a later line for a name wins."""
    log = log or path()
    if not log or not os.path.exists(log):
        return {}
    entries = {}
    with open(log) as f:
        for entry in map(json.loads, filter(str.strip, f)):
            entries[entry.get("name") or entry["spec"].rsplit(":", 1)[-1]] = entry
    return entries
