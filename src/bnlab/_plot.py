"""matplotlib for bnlab's figures: imported lazily, on the Agg backend (no display needed);
a figure saved as PNG bytes, or as a file written atomically."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def subplots(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(...)``'s ``(fig, axes)``; the figure is closed on leaving, even on error."""
    plt = pyplot()
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def png_bytes(fig: Any) -> bytes:
    """``fig`` as PNG, at the figure's own dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig: Any, path: Path, dpi: int) -> None:
    """Lay ``fig`` out tightly, write it to ``path`` as PNG (atomically) and close it."""
    from bnlab._io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
