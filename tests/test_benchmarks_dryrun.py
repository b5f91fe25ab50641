"""CI's dry run of the benchmarks: the GPU script up to its CUDA steps, and the one-command runner
on the quick model set (every registered preset, every peer, few iterations)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel, so the script's join + offline install run for real."""
    name = "fxc_probe_pkg-1.0-py3-none-any.whl"
    files = {
        "fxc_probe_pkg/__init__.py": b"VALUE = 42\n",
        "fxc_probe_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fxc-probe-pkg\nVersion: 1.0\n",
        "fxc_probe_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        # Random padding (incompressible) so the wheel splits into several parts.
        "fxc_probe_pkg/padding.bin": os.urandom(6000),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("fxc_probe_pkg-1.0.dist-info/RECORD,,")
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr("fxc_probe_pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _split(wheel: Path, part_size: int = 4000) -> list[Path]:
    (wheel.parent / f"{wheel.name}.sha256").write_text(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    data, parts = wheel.read_bytes(), []
    for i in range(0, len(data), part_size):
        part = wheel.parent / f"{wheel.name}.part-a{chr(ord('a') + i // part_size)}"
        part.write_bytes(data[i:i + part_size])
        parts.append(part)
    wheel.unlink()
    return parts


def _gpu_sh(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BENCH / "gpu.sh"), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_gpu_script_dry_run_joins_installs_and_stops_before_cuda(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    parts = _split(_tiny_wheel(wheels))
    assert len(parts) >= 2
    out = tmp_path / "out"
    result = _gpu_sh("--dry-run", "--skip-cpu-tests", "--wheels", str(wheels), "--out", str(out))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert f"joined {len(parts)} parts -> fxc_probe_pkg-1.0-py3-none-any.whl" in log
    assert "no GPU: stopping before CUDA steps" in log or "dry run: the CUDA provider is active" in log
    assert "6/7" not in log  # nothing CUDA ran
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cores"] and machine["onnxruntime"] and "torch" in machine
    assert (out / "gpu_log.txt").read_text().count("== [") == 5


def test_gpu_script_refuses_a_wheel_with_a_missing_part(tmp_path):
    parts = _split(_tiny_wheel(tmp_path))
    parts[-1].unlink()
    result = _gpu_sh("--dry-run", "--wheels", str(tmp_path), "--out", str(tmp_path / "out"), timeout=60)
    assert result.returncode == 1
    assert "does not match" in result.stderr and "a part is missing" in result.stderr


def test_gpu_script_rejects_unknown_arguments():
    result = _gpu_sh("--bogus", timeout=30)
    assert result.returncode == 2 and "unknown argument '--bogus'" in result.stderr


def test_quick_run_covers_every_preset_and_peer(tmp_path):
    from fxcompress.passes.presets import PRESETS

    out = tmp_path / "results"
    result = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "models" / "tiny_cnn_b1.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    expected = {"torch eager", "torch.onnx.export", "onnxsim", "ORT static int8", "ORT dynamic int8"}
    expected |= {f"fxcompress:{name}" for name in PRESETS}
    assert set(rows) == expected
    for row in rows.values():
        # Every row either ran (timed, with parity) or says why it did not.
        if row["status"] == "ok":
            assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"] and -1.000001 <= row["cosine"] <= 1.000001
        else:
            assert row["error"]
    plain = rows["torch.onnx.export"]
    assert plain["status"] == "ok" and plain["speedup"] == pytest.approx(1.0)
    assert plain["macs"] and plain["size_mb"] > 0 and plain["compile_s"] > 0
    assert record["command"].startswith("python benchmarks/run.py --quick")
    assert record["machine"]["cpu"] and record["machine"]["onnxruntime"]
    combined = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in combined["records"]] == ["tiny_cnn"]
    table = (out / "results.md").read_text()
    assert "| tiny_cnn | 1 | torch.onnx.export |" in table
    assert "`python benchmarks/run.py --quick" in table  # the command beside the figures
    assert not (out / "README_section.md").exists()  # no README section: the docs quote results.md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "latency_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_preset_is_a_row_with_its_reason(runner, tmp_path, monkeypatch):
    from fxcompress.infra.recipe import PassStep, Recipe
    from fxcompress.passes import presets

    broken = lambda: Recipe(name="broken", description="names a pass that does not exist", steps=[PassStep("no-such-pass")])  # noqa: E731
    monkeypatch.setitem(presets.PRESETS, "broken", broken)
    assert runner.main(["--quick", "--peers", "plain", "--presets", "broken", "--out", str(tmp_path), "--rounds", "1", "--block", "1"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "models" / "tiny_cnn_b1.json").read_text())["rows"]}
    assert rows["fxcompress:broken"]["status"] == "failed"
    assert "no-such-pass" in rows["fxcompress:broken"]["error"]
    assert rows["torch.onnx.export"]["status"] == "ok"
    assert "failed: " in (tmp_path / "results.md").read_text()


def test_resume_keeps_finished_models(runner, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny_cnn_b1.json").write_text(json.dumps({
        "model": "tiny_cnn", "batch": 1, "provider_requested": "cpu", "seconds": 1, "command": "earlier", "machine": {},
        "rows": []}))
    assert runner.main(["--quick", "--resume", "--out", str(tmp_path)]) == 0
    assert "kept from" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["records"][0]["command"] == "earlier"


def test_unknown_names_are_refused_before_any_work(runner, tmp_path, capsys):
    assert runner.main(["--models", "resnet9000", "--out", str(tmp_path)]) == 2
    assert "unknown model(s) ['resnet9000']" in capsys.readouterr().err
    assert runner.main(["--quick", "--presets", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset(s) ['nope']" in capsys.readouterr().err


def test_cuda_request_without_a_gpu_is_labelled_as_fallback(runner, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: no fallback to show")
    assert runner.main(["--quick", "--provider", "cuda", "--peers", "plain", "--presets", "none", "--out", str(tmp_path),
                        "--rounds", "1", "--block", "1"]) == 0
    row = json.loads((tmp_path / "models" / "tiny_cnn_b1.json").read_text())["rows"][0]
    assert row["provider"] == "cpu" and row["fell_back"] is True
    assert row["placement"]["fell_back"] is True  # every compute op reported as off the GPU
    assert "FELL BACK" in (tmp_path / "results.md").read_text()


def test_reparameterization_quick_run_writes_the_peer_comparison(tmp_path):
    pytest.importorskip("timm")
    result = subprocess.run([sys.executable, str(BENCH / "reparameterization.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "reparameterization.json").read_text())
    row = data["reparameterizable"][0]
    assert row["model"] == "repvgg_a0" and row["merged"] > 0
    assert set(row["variants"]) == {"plain", "fxcompress default", "timm reparameterize"}
    assert row["variants"]["fxcompress default"]["relative"] < 1e-5
    assert data["zoo"][0]["merged"] == 0  # nothing to merge in ResNet-18: its graph is what it was
    assert "| repvgg_a0 |" in (tmp_path / "reparameterization.md").read_text()


def test_trained_encoder_quick_run_writes_every_variant(tmp_path):
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, str(BENCH / "trained_encoder.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "trained_encoder.json").read_text())
    variants = {(r["model"], r["variant"]): r for r in record["rows"]}
    expected = {"fp32", "fxcompress int8", "fxcompress int8-dynamic", "fxcompress int8-dynamic, no calibration",
                "ORT quantize_static", "ORT quantize_dynamic"}
    for model in ("digits-encoder", "digits-encoder + outlier channels"):
        assert {v for m, v in variants if m == model} == expected
        for variant in expected:
            row = variants[(model, variant)]
            assert row["status"] == "ok" or row["error"]
        assert variants[(model, "fp32")]["cosine_min"] > 0.9999 and variants[(model, "fp32")]["speedup"] == pytest.approx(1.0)
    # smoothing is exact, so static int8 sees the same ranges with or without the outlier channels
    assert variants[("digits-encoder + outlier channels", "fxcompress int8")]["cosine_min"] > 0.98
    kernels = variants[("digits-encoder", "fxcompress int8")]["ort_kernels"]
    assert kernels["QGemm"] == 1 + 4 * 3 + 2 and not {"Gemm", "FusedGemm"} & set(kernels), kernels
    assert "| digits-encoder | fxcompress int8 |" in (tmp_path / "trained_encoder.md").read_text()


def test_depthwise_int8_quick_run_compares_with_ort_and_scores_the_trained_mobilenet(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, str(BENCH / "depthwise_int8.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "depthwise_int8.json").read_text())
    rows = {r["variant"]: r for r in record["random_weights"]}
    assert set(rows) == {"fp32 (plain export)", "fxcompress int8", "ORT quantize_static",
                         "fxcompress int8 without equalize-layers, correct-bias"}
    for row in rows.values():
        assert row["status"] == "ok" and row["weights"] == "random", row
        assert row["p50_ms"] > 0 and 0 < row["cosine_vs_fp32"] <= 1.000001
    assert rows["fxcompress int8"]["pass_stats"]["correct-bias"]["corrected"] > 0
    digits = {r["variant"]: r for r in record["trained"]["rows"]}
    assert record["trained"]["weights"] == "trained"
    assert {"fp32 (torch.onnx.export)", "ORT quantize_static", "fxcompress:int8"} <= set(digits)
    assert all(r["status"] == "ok" or r["error"] for r in digits.values())
    assert record["meta"]["command"].startswith("python benchmarks/depthwise_int8.py --quick")
    table = (tmp_path / "depthwise_int8.md").read_text()
    assert "RANDOM WEIGHTS" in table and "## Trained: DigitsMobileNet" in table


def test_trained_models_quick_run_writes_every_model_and_variant(tmp_path):
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, str(BENCH / "trained_models.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "command: python benchmarks/trained_models.py --quick" in result.stdout and "machine: " in result.stdout
    record = json.loads((tmp_path / "trained_models.json").read_text())
    variants = {(r["model"], r["variant"]): r for r in record["rows"]}
    expected = {"fp32", "fxcompress default", "fxcompress int8", "fxcompress int8-dynamic", "fxcompress fp16",
                "fxcompress prune + fine-tuning", "ORT quantize_static", "ORT quantize_dynamic"}
    for model in ("digits-cnn", "digits-encoder", "digits-mobilenet"):
        assert {v for m, v in variants if m == model} == expected, model
        fp32 = variants[(model, "fp32")]
        assert fp32["status"] == "ok" and fp32["delta_points"] == 0 and fp32["speedup"] == pytest.approx(1.0)
        for variant in expected:
            row = variants[(model, variant)]
            assert row["weights"] == "trained" and (row["status"] == "ok" or row["error"]), row
        prune = variants[(model, "fxcompress prune + fine-tuning")]
        assert prune["status"] == "ok" and prune["macs"][1] < prune["macs"][0] and "within_target" in prune
    table = (tmp_path / "trained_models.md").read_text()
    assert "TRAINED" in table and "| digits-encoder | fxcompress int8-dynamic |" in table
    assert "Command: `python benchmarks/trained_models.py --quick" in table
