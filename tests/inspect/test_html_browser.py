"""The HTML report in a real headless browser: loads without script errors, shows passes and figures.

Uses Debian's Chromium (``apt-get install chromium``; .ci/run installs it). The page writes script
errors into the DOM and marks ``body[data-ready]`` when its script has run, so ``--dump-dom``
tells a working page from a broken one; a deliberately broken page checks that detection.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import fxcompress
from fxcompress.inspect.render_html import Variant, render_report_html, write_report
from tests.inspect.helpers import FoldBatchNormForTests, residual

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium; .ci/run does it)")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def result():
    model, inputs = residual()
    return fxcompress.compile(model, inputs, [FoldBatchNormForTests(), "eliminate-dead-code"])


VARIANTS = [Variant("plain torch.onnx.export", 0.42, 0.5, 20_000, "cpu"), Variant("fxcompress default", 0.31, 0.4, 16_000, "cpu")]


def test_report_runs_its_script_and_shows_passes_and_figures(tmp_path, result):
    page = write_report(tmp_path / "report.html", result, variants=VARIANTS)
    done = _chromium(tmp_path, "--dump-dom", page.as_uri())
    dom = done.stdout
    assert 'data-ready="yes"' in dom, done.stderr[-2000:]
    assert re.search(r"<html[^>]*data-js-errors", dom) is None and '<p id="js-errors"></p>' in dom
    assert "interactive: 2 passes" in dom
    passes = re.findall(r'<li class="pass ([\w-]+)[^"]*" data-index="\d+" title="([^"]+)"', dom)
    assert passes == [("pass-changed", "test-fold-batchnorm"), ("pass-unchanged", "eliminate-dead-code")]
    # The script selected the first changed pass and showed its diff panel.
    assert re.search(r'<div class="panel shown" data-index="0">.*?Removed aten.batch_norm \(3\):</b> bn0, bn1, bn2', dom)
    assert dom.count('class="figure"') == 2 and dom.count('class="point"') == 2


def test_screenshot_shows_a_rendered_page(tmp_path, result):
    image = pytest.importorskip("PIL.Image")
    page = write_report(tmp_path / "report.html", result, variants=VARIANTS)
    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    with image.open(shot) as png:
        assert png.size == (1280, 1600)
        colours = png.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text, bars and the dark header: not a blank page


def test_a_script_error_is_detected(tmp_path, result):
    """Negative control: the same check fails on a page whose script throws."""
    broken = render_report_html(result).replace("(function () {", "(function () { undefinedFunction();", 1)
    path = tmp_path / "broken.html"
    path.write_text(broken)
    dom = _chromium(tmp_path, "--dump-dom", path.as_uri()).stdout
    assert re.search(r'<html[^>]*data-js-errors="1"', dom) and 'data-ready="yes"' not in dom
    assert "undefinedFunction is not defined" in dom
