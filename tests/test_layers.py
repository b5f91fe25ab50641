"""The layer contract (docs/design.md, "Package layout and layers") holds and is enforced.

`lint-imports` (import-linter) checks the `layers` contract in pyproject.toml; `make test` runs it
before pytest, and these tests run it too, check it covers every module of the package, that it
really fails on an upward import, and that no import cycle exists between modules.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx
import pytest

import fxcompress

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in config if c["type"] == "layers"]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"})


def test_the_layer_contract_is_kept():
    done = _lint(ROOT, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_every_module_of_the_package_is_in_a_layer():
    listed = {name for layer in _layers() for name in layer}
    children = {f"fxcompress.{m.name}" for m in pkgutil.iter_modules(fxcompress.__path__)}
    assert children == listed, f"not in the contract: {sorted(children - listed)}; stale: {sorted(listed - children)}"


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "fxcompress", tmp_path / "fxcompress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "fxcompress" / "analysis" / "shapes.py", "a") as f:
        f.write("\nfrom fxcompress.api import compile  # noqa: an upward import, on purpose\n")
    done = _lint(tmp_path, tmp_path)
    assert done.returncode != 0
    assert "fxcompress.analysis is not allowed to import fxcompress.api" in done.stdout


def test_no_import_cycles_between_modules():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("fxcompress", cache_dir=None)
    imports = nx.DiGraph()
    for module in graph.modules:
        if module == "fxcompress":  # the package root re-exports the API: imports of it are not layer edges
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != "fxcompress" and not module.startswith(imported + "."):
                imports.add_edge(module, imported)
    cycles = list(nx.simple_cycles(imports))
    assert not cycles, f"import cycles: {cycles[:5]}"
