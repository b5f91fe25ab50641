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


def test_a_bf16_size_is_built_in_bf16_and_reports_both_multiples():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scaling_memory
    finally:
        sys.path.pop(0)
    import torch

    model = scaling_memory._llama("tiny-bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() is torch.float32  # restored
    row = {"model": "tiny-bf16", "tool": "fxcompress", "preset": "default", "weights_bytes": 400, "stored_bytes": 200,
           "seconds": 1.0, "baseline_bytes": 100, "peak_bytes": 900, "stages": {}}
    assert "| 2.0 (4.0x as stored) |" in scaling_memory.table([row])
