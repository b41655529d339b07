"""Write :class:`~bnlab.inspect.panels.InspectResult` panels as PNGs and one HTML page.

For each result ``LABEL``: ``LABEL-activations.png``, ``LABEL-gradients.png``,
``LABEL-weights.png``, ``LABEL-updates.png``, plus ``stats.json`` (every number) and
``index.html`` with the images embedded (base64), one column per result, so that a model
with and without BN sit side by side. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab._io import atomic_write_bytes, atomic_write_text
from bnlab.inspect.panels import SATURATION, Histogram, InspectResult

PANELS = (
    ("activations", "1. Activations",
     f"Histogram of each nonlinearity's output on the first batch; saturated = |tanh| > "
     f"{SATURATION} (sigmoid: |2s − 1| > {SATURATION}), dead = units zero for every sample."),
    ("gradients", "2. Activation gradients",
     "Histogram of the loss gradient at each nonlinearity's output (first batch)."),
    ("weights", "3. Weight gradients",
     "Histogram of each weight's gradient (first batch); grad:data = std(grad) / std(weight)."),
    ("updates", "4. Update:data ratio",
     "log10(std(update) / std(weight)) per weight and step, the update being what the "
     "optimizer applied; the dashed line is 1e-3."),
)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _hist_plot(ax: Any, h: Histogram, label: str) -> None:
    ax.plot(h.centres(), h.density, label=label)


def _figure(result: InspectResult, panel: str) -> bytes:
    from matplotlib.ticker import MaxNLocator

    from bnlab._plot import png_bytes, subplots

    with subplots(figsize=(8, 3.6), dpi=100) as (fig, ax):
        if panel == "activations":
            for a in result.activations:
                extra = (f", sat {_pct(a.saturated)}" if a.saturated is not None
                         else f", dead {_pct(a.dead)}" if a.dead is not None else "")
                _hist_plot(ax, a.hist, f"{a.name} ({a.kind}): std {a.std:.2f}{extra}")
            ax.set_xlabel("activation")
        elif panel == "gradients":
            for g in result.gradients:
                _hist_plot(ax, g.hist, f"{g.name} ({g.kind}): std {g.std:.2e}")
            ax.set_xlabel("gradient at the activation")
        elif panel == "weights":
            for w in result.weights:
                _hist_plot(ax, w.hist, f"{w.name} {tuple(w.shape)}: grad:data {w.grad_data:.2e}")
            ax.set_xlabel("weight gradient")
        else:
            for name, series in result.updates.items():
                ax.plot(range(1, len(series) + 1),
                        [v if math.isfinite(v) else float("nan") for v in series], label=name)
            ax.axhline(-3.0, color="k", linestyle="--", linewidth=1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step")
            ax.set_ylabel("log10 update:data")
        if panel != "updates":
            ax.set_ylabel("density")
        ax.set_title(f"{result.label}: {panel}")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        return png_bytes(fig)


def _table(result: InspectResult, panel: str) -> str:
    head: tuple[str, ...]
    rows: list[tuple[str, ...]]
    if panel == "activations":
        head = ("layer", "kind", "mean", "std", "saturated", "zeros", "dead units")
        rows = [(a.name, a.kind, f"{a.mean:+.3f}", f"{a.std:.3f}", _pct(a.saturated),
                 _pct(a.zero), _pct(a.dead)) for a in result.activations]
    elif panel == "gradients":
        head = ("layer", "kind", "mean", "std")
        rows = [(g.name, g.kind, f"{g.mean:+.2e}", f"{g.std:.2e}") for g in result.gradients]
    elif panel == "weights":
        head = ("weight", "shape", "grad mean", "grad std", "grad:data")
        rows = [(w.name, "×".join(map(str, w.shape)), f"{w.mean:+.2e}", f"{w.std:.2e}",
                 f"{w.grad_data:.2e}") for w in result.weights]
    else:
        head = ("weight", "first step", "last step", "mean of last 10")
        rows = []
        for name, s in result.updates.items():
            tail = [v for v in s[-10:] if math.isfinite(v)]
            rows.append((name, f"{s[0]:.2f}", f"{s[-1]:.2f}",
                         f"{sum(tail) / len(tail):.2f}" if tail else ""))
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.row{display:flex;gap:1.5em;flex-wrap:wrap} .col{flex:1;min-width:420px}
img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.8em;margin-top:.4em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
p.note{color:#555;font-size:.9em}
"""


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(
    results: Sequence[InspectResult], out_dir: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Write the PNGs, ``stats.json`` and ``index.html`` for ``results``; return the page."""
    if not results:
        raise ValueError("write_report: no results to write")
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"write_report: labels must differ, got {labels}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for panel, heading, note in PANELS:
        cols = []
        for r in results:
            png = _figure(r, panel)
            atomic_write_bytes(out / f"{r.label}-{panel}.png", png)
            data = base64.b64encode(png).decode("ascii")
            cols.append(f'<div class="col"><h3>{html.escape(r.label)}</h3>'
                        f'<img alt="{html.escape(r.label)} {panel}" '
                        f'src="data:image/png;base64,{data}">{_table(r, panel)}</div>')
        sections.append(f"<h2>{heading}</h2><p class=note>{html.escape(note)}</p>"
                        f'<div class="row">{"".join(cols)}</div>')
    summary = "".join(
        f"<li><b>{html.escape(r.label)}</b>: {r.steps} steps, loss {r.losses[0]:.3f} → "
        f"{r.losses[-1]:.3f}; mean saturation {_pct(r.mean_saturation()) or 'n/a'}; median "
        f"log10 update:data (last 10 steps) {r.median_update_ratio():.2f}</li>"
        for r in results
    )
    heading = html.escape(title or "bnlab inspect")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{heading}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{heading}</h1><ul>{summary}</ul>"
            f"{''.join(sections)}</body></html>")
    atomic_write_text(out / "stats.json",
                      json.dumps(_json_safe([r.to_dict() for r in results]), indent=1))
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
