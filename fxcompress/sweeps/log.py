"""The sweep's results log: one JSON object per line, appended as each trial finishes.

Appending (and flushing) one line per trial means an interrupted sweep keeps every trial that
finished, and a rerun reads the log back to skip them. A later line for a key replaces an
earlier one (a retried trial), and a torn last line (the process was killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fxcompress.errors import InputError


class TrialLog:
    """The JSON-lines log at ``path`` (created with its folder on the first append)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"The sweep log {self.path} is a folder.", "give a file path such as sweep.jsonl.")

    def read(self) -> dict[str, dict]:
        """The logged records by key, in first-logged order (the last line for a key wins)."""
        if not self.path.exists():
            return {}
        records: dict[str, dict] = {}
        with self.path.open() as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write: that trial simply runs again
                if isinstance(record, dict) and "key" in record:
                    records[record["key"]] = record
        return records

    def append(self, record: dict) -> None:
        """Append ``record`` (which has a ``key``) as one line, flushed to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with self.path.open("a") as f:
            f.write(("\n" if torn else "") + json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
