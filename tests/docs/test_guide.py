"""Every code block of the guide runs, and shows what it prints.

Rules for docs/*.md (docs/results/ is the lab's output and is not scanned):

- ```python blocks run in order, one namespace per page, in a temporary folder (where
  ``docs/`` leads to the real docs/, so ``docs/results/...`` reads the lab's results). A block
  followed directly by an ```output block must print exactly that (``...`` in the output
  stands for any text, as in doctest's ELLIPSIS).
- ```console blocks hold ``$ bnlab ...`` commands (run through ``bnlab.cli.main``), each
  followed by the lines it prints on stdout (``...`` again matches anything); a
  ``# exit N`` line after them states a non-zero exit code (stderr is then shown too).
- ```text blocks are formulas and tables for reading; no other language is allowed, so
  that nothing in the guide escapes this test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bnlab.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "results" not in p.relative_to(DOCS).parts)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
ALLOWED = {"python", "output", "console", "text"}


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def matches(expected: str, got: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, got.strip(), re.S) is not None


@contextlib.contextmanager
def _in(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _run_console(block: str) -> None:
    lines = block.strip().splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ bnlab "), f"a console block runs '$ bnlab ...': {lines[i]}"
        argv = shlex.split(lines[i][2:])[1:]
        expected, code = [], 0
        i += 1
        while i < len(lines) and not lines[i].startswith("$ "):
            if lines[i].startswith("# exit "):
                code = int(lines[i].split()[2])
            else:
                expected.append(lines[i])
            i += 1
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            got_code = main(argv)
        # Progress lines go to stderr: it is shown only for a failing command (its error).
        shown = out.getvalue() + (err.getvalue() if got_code else "")
        assert got_code == code, f"$ bnlab {shlex.join(argv)} exited {got_code}:\n{shown}"
        assert matches("\n".join(expected), shown), (
            f"$ bnlab {shlex.join(argv)} printed:\n{shown}\nthe guide shows:\n"
            + "\n".join(expected))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_block_runs_and_prints_what_it_shows(
    page: Path, tmp_path: Path, single_threaded: None
) -> None:
    found = blocks(page)
    unknown = sorted({lang or "(none)" for lang, _ in found} - ALLOWED)
    assert not unknown, f"{page.name}: code blocks in {unknown}; use python/console/text"
    namespace: dict[str, object] = {"__name__": "__guide__"}
    torch.manual_seed(0)
    # Blocks read the lab's results as docs/results/..., as from the repository root.
    (tmp_path / "docs").symlink_to(DOCS)
    with _in(tmp_path):
        for k, (lang, code) in enumerate(found):
            if lang == "console":
                _run_console(code)
            if lang != "python":
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{page.name}[block {k + 1}]", "exec"), namespace)
            follows = found[k + 1] if k + 1 < len(found) else None
            if follows is not None and follows[0] == "output":
                assert matches(follows[1], out.getvalue()), (
                    f"{page.name} block {k + 1} printed:\n{out.getvalue()}\n"
                    f"the guide shows:\n{follows[1]}")


def test_the_guide_has_code_on_every_guide_page() -> None:
    guide = [p for p in PAGES if p.parent.name == "guide"]
    assert len(guide) >= 7
    for page in guide:
        assert any(lang in ("python", "console") for lang, _ in blocks(page)), page.name


def test_matches_treats_dots_as_a_wildcard() -> None:
    assert matches("PASS forward... in ... s", "PASS forward: 6 cases in 0.1 s")
    assert not matches("PASS", "FAIL")
