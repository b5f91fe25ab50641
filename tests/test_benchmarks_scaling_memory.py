"""Dry run of benchmarks/scaling_memory.py: --quick measures a tiny decoder in fresh processes and
writes the table (fxcompress's row with where its time went, plain torch.onnx.export beside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_a_row_per_tool_with_peak_and_stages(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "scaling"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_memory.py"), "--quick", "--out", str(out)],
                   env=env, check=True, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["tool"], r["preset"]) for r in rows] == [("fxcompress", "default"), ("torch.onnx.export", "-")]
    for row in rows:
        assert "error" not in row and row["peak_bytes"] > row["baseline_bytes"] > 0 and row["seconds"] > 0
    assert {"capture", "passes", "verification", "export", "parity"} <= set(rows[0]["stages"])
    text = out.with_suffix(".md").read_text()
    assert "Command: `python benchmarks/scaling_memory.py --quick" in text and "| tiny |" in text
