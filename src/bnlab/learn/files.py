"""Where the exercise templates and reference solutions are, and writing a template out."""

from __future__ import annotations

import os
from pathlib import Path

from bnlab._io import atomic_write_text
from bnlab.errors import BnlabError
from bnlab.learn.grading import get_exercise

_HERE = Path(__file__).resolve().parent


def template_path(name: str) -> Path:
    """The template ``bnlab learn start NAME`` copies."""
    get_exercise(name)
    return _HERE / "templates" / f"{name}.py"


def solution_path(name: str) -> Path:
    """The reference solution of exercise ``name`` (it passes ``bnlab learn check``)."""
    get_exercise(name)
    return _HERE / "solutions" / f"{name}.py"


def write_template(
    name: str, out: str | os.PathLike[str] | None = None, *, force: bool = False
) -> Path:
    """Write exercise ``name``'s template to ``out`` (default ``bn_NAME.py``); return it.

    An existing file is never overwritten unless ``force``: it may hold the learner's work.
    """
    target = Path(out) if out is not None else Path(f"bn_{name}.py")
    text = template_path(name).read_text(encoding="utf-8")
    if target.exists() and not force:
        raise BnlabError(f"{target} already exists (your work?); pass --force to overwrite it "
                         f"or --out another file")
    if target.exists() and target.is_dir():
        raise BnlabError(f"{target} is a folder; expected a file name for the template")
    atomic_write_text(target, text)
    return target
