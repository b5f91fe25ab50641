"""The code in README.md and the docs/ pages runs as written.

Convention (also stated in docs/development.md, "Documentation that runs"):

- A ```python block runs. The blocks of one page run in order, in one namespace, in a fresh
  temporary folder (so a later block uses what an earlier one made, as a reader would).
- A ```bash block runs only when the line before its fence is ``<!-- run -->``; each line (after
  ``#`` comments are removed) must be an ``fxcompress ...`` command, run in this process through
  ``fxcompress.cli.main`` and expected to exit 0.
- A block preceded by ``<!-- file: NAME -->`` is written to NAME in that folder before the page's
  next block runs (a TOML recipe a later command reads).
- ``<!-- skip: REASON -->`` before a fence keeps a block from running; the reason is required and
  says why (needs a GPU, downloads weights from a hub, takes minutes, is a fragment).
- Other blocks (toml, text, output) are shown, not run.

docs/writing_passes.md has its own test (test_writing_passes.py: it runs as a user's package in
subprocesses) and is not run here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OWN_TEST = {"writing_passes.md"}  # pages whose code another test runs
FENCE = re.compile(
    r"(?:^[ \t]*<!--\s*(?P<kind>skip|run|file)\s*(?::\s*(?P<arg>[^>]*?))?\s*-->[ \t]*\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    kind: str | None  # "skip", "run", "file" or None
    arg: str | None


def pages() -> list[Path]:
    docs = sorted(p for p in (REPO / "docs").rglob("*.md") if p.name not in OWN_TEST)
    return [REPO / "README.md", *docs]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("indent")) + 1
        found.append(Block(str(page.relative_to(REPO)), line, m["lang"], textwrap.dedent(m["body"]), m["kind"],
                           m["arg"]))
    return found


def runs(block: Block) -> bool:
    if block.kind == "skip":
        return False
    return block.lang == "python" or (block.lang == "bash" and block.kind == "run")


def runnable_pages() -> list[Path]:
    return [p for p in pages() if any(runs(b) or b.kind == "file" for b in blocks(p))]


def test_every_skip_says_why_and_every_marker_is_known():
    for page in pages():
        for block in blocks(page):
            where = f"{block.page}:{block.line}"
            if block.kind == "skip":
                assert block.arg and len(block.arg) > 8, f"{where}: <!-- skip: REASON --> needs a reason"
            if block.kind == "run":
                assert block.lang == "bash", f"{where}: <!-- run --> is for bash blocks (python blocks run anyway)"
            if block.kind == "file":
                assert block.arg, f"{where}: <!-- file: NAME --> needs a file name"


def test_the_pages_have_code_that_runs():
    """Guards the extraction itself: the README and the guide pages do have runnable blocks."""
    names = {p.name for p in runnable_pages()}
    assert {"README.md", "api.md", "cli.md", "presets.md", "decoders.md", "inspection.md"} <= names, names


def test_the_api_reference_has_every_public_name():
    """docs/reference.md documents every name a user imports from fxcompress (mkdocstrings renders
    each ``::: fxcompress.NAME``; the strict build fails if one no longer resolves)."""
    import fxcompress

    reference = (REPO / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: fxcompress\.(\w+)", reference, re.M))
    errors = {name for name in fxcompress.__all__ if name.endswith("Error")}
    missing = set(fxcompress.__all__) - documented - errors
    assert not missing, f"add `::: fxcompress.NAME` for {sorted(missing)} to docs/reference.md"
    assert "errors" in documented  # the error classes are documented as the fxcompress.errors module


def run_cli_line(line: str, where: str) -> str:
    from fxcompress.cli import main

    argv = shlex.split(line, comments=True)
    assert argv[0] == "fxcompress", f"{where}: a <!-- run --> bash block holds fxcompress commands only: {line!r}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv[1:])
    assert code == 0, f"{where}: `{line}` exited {code}:\n{out.getvalue()}"
    return out.getvalue()


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # package.module:function specs a page writes
    namespace: dict = {"__name__": "__main__"}  # a reader runs the page as a script
    for block in blocks(page):
        where = f"{block.page}:{block.line}"
        if block.kind == "file" and block.arg:
            (tmp_path / block.arg).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.arg).write_text(block.body)
        if not runs(block):
            continue
        if block.lang == "python":
            try:
                exec(compile(block.body, where, "exec"), namespace)  # noqa: S102 - the page's own code
            except Exception as exc:  # pragma: no cover - the message is the point
                raise AssertionError(f"{where}: the block raised {type(exc).__name__}: {exc}") from exc
        else:
            for line in block.body.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    run_cli_line(line.strip(), where)
