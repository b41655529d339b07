"""Environment variables set for one block of code, then put back as they were."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set each ``NAME=value`` for the block only (a None value leaves that name alone)."""
    changes = {name: value for name, value in values.items() if value is not None}
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
