"""docs/writing_passes.md runs as written: its file blocks become a user's folder, and the pass it
defines runs through compile(), a TOML recipe and the CLI, and passes its own tests."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "writing_passes.md"
#: A fenced block preceded by ``<!-- file: PATH -->`` is the content of PATH in the user's folder.
BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\s*```\w*\n(?P<body>.*?)```", re.S)


def doc_files() -> dict[str, str]:
    return {m["path"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    for path, body in doc_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(body)
    return root


def run(user_dir: Path, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_dir), str(REPO)])}
    done = subprocess.run([sys.executable, *argv], cwd=user_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_doc_has_every_file_the_routes_need():
    assert {"my_passes/__init__.py", "my_passes/models.py", "run_compile.py", "my.toml", "run_toml.py", "run_cli.sh",
            "test_my_passes.py"} <= set(doc_files())


def test_the_example_rule_leaves_rewiring_and_erasing_to_the_engine():
    rule = doc_files()["my_passes/__init__.py"]
    assert "def pattern(self, ctx, node)" in rule and "return Reject(" in rule
    assert not any(manual in rule for manual in ("replace_all_uses_with", ".erase(", ".stamp("))


def test_route_a_compile_with_a_list_of_pass_names(user_dir):
    out = run(user_dir, "run_compile.py")
    assert "'muls_folded': 3" in out
    assert "multiplications left: 2" in out
    # why-not shows the RewritePass's rejection, with the rule and the check's reason
    assert "scalar-mul-chain (1 near-miss)" in out and "folding saves nothing" in out


def test_route_b_toml_recipe_with_imports_and_a_nested_pipeline(user_dir):
    out = run(user_dir, "run_toml.py")
    assert "'muls_folded': 3" in out


def test_route_c_cli_with_the_toml_recipe(user_dir):
    (command,) = [line for line in (user_dir / "run_cli.sh").read_text().splitlines() if line.startswith("fxcompress ")]
    argv = shlex.split(command)[1:]
    out = run(user_dir, "-m", "fxcompress.cli", *argv)
    assert re.search(r"fold-scalar-muls.*muls_folded=3", out), out
    assert "scalar-mul-chain (1 near-miss)" in out and "folding saves nothing" in out
    assert (user_dir / "scaled.onnx").is_file()


def test_the_users_own_tests_pass(user_dir):
    out = run(user_dir, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "test_my_passes.py")
    assert "3 passed" in out
