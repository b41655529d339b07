"""``bnlab.inspect``: Karpathy's four diagnostic panels for any PyTorch model.

:func:`inspect` (``bnlab.inspect.inspect(model, batches, steps=...)``) measures them with
hooks and restores the model; :func:`write_report` writes the PNGs and a self-contained
HTML page, one column per result (with and without BN side by side). Importing this
package is cheap: torch loads on first use of a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlab.inspect.panels import InspectResult, inspect
    from bnlab.inspect.report import write_report

__all__ = ["InspectResult", "inspect", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("InspectResult", "inspect"):
        from bnlab.inspect import panels

        return getattr(panels, name)
    if name == "write_report":
        from bnlab.inspect import report

        return report.write_report
    raise AttributeError(f"module 'bnlab.inspect' has no attribute {name!r}")
