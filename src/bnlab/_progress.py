"""Progress reporting: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """A counter shown as a tqdm bar (terminal) or a line every ``every_s`` seconds.

    ``enabled=None`` means: a bar on a terminal, lines otherwise; ``False`` is silent.
    Use as a context manager; ``update(n)``, ``set_postfix(**kv)``.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        enabled: bool | None = None,
        unit: str = "it",
        every_s: float = 10.0,
        position: int | None = None,
        leave: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.silent = enabled is False
        self.n = 0
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        if not self.silent and stderr_is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, dynamic_ncols=True, position=position,
                leave=leave,
            )

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.silent and time.monotonic() - self._last >= self.every_s:
            self._line()

    def set_postfix(self, **kv: Any) -> None:
        self._postfix = kv
        if self._bar is not None:
            self._bar.set_postfix(kv, refresh=False)

    def _line(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and self.n:
            eta = f", eta {elapsed / self.n * (self.total - self.n):.0f}s"
        extra = "".join(f", {k}={v}" for k, v in self._postfix.items())
        print(f"{self.desc}: {done} {self.unit} ({elapsed:.0f}s{eta}){extra}", file=sys.stderr,
              flush=True)

    def close(self, *, final_line: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.silent and self.n and final_line:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On an error, no closing progress line: the error's own line is what to read.
        self.close(final_line=exc_type is None)


def progress(
    iterable: Iterable[T], desc: str, *, total: int | None = None, enabled: bool | None = None,
    unit: str = "it",
) -> Iterator[T]:
    """Iterate with a :class:`Progress` display."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, enabled=enabled, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update()
