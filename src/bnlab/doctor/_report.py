"""The doctor's report: findings, per-layer statistics, and the three ways to show them
(a terminal table, JSON, a self-contained HTML page with the statistics-gap plot)."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "error")


def severity_rank(severity: str) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}; got {severity!r}")
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Finding:
    """One problem (or, at ``info``, one measurement) the doctor found.

    ``code`` names the kind (see :data:`bnlab.doctor.CODES`); ``layers`` the qualified module
    names it concerns; ``evidence`` the measured numbers, ``value`` the headline one; ``fix``
    the remedy as one call; ``remedy`` the name :func:`bnlab.doctor.fix` takes for it (None
    when there is no automatic remedy); ``effect`` the loss/accuracy before and after the
    remedy where it was measured (``{"loss": [before, after], "accuracy": [before, after]}``).
    """

    code: str
    severity: str
    layers: tuple[str, ...]
    title: str
    evidence: str
    fix: str
    remedy: str | None = None
    value: float | None = None
    effect: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["value"] = _json_number(self.value)
        return d


@dataclass
class LayerStats:
    """What the doctor measured about one BN layer (None where not measured)."""

    name: str
    kind: str
    num_features: int
    momentum: float | None
    eps: float
    tracked: bool
    training: bool
    calls_per_forward: int | None = None
    values_per_channel: int | None = None
    gap_mean: float | None = None
    gap_max: float | None = None
    dropout_var_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) if isinstance(v, float) else v
                for k, v in dataclasses.asdict(self).items()}


def _json_number(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)  # JSON has no NaN/Inf


@dataclass
class Report:
    """What :func:`bnlab.doctor.examine` returns."""

    model: str
    findings: list[Finding]
    layers: list[LayerStats]
    data: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def at_least(self, severity: str) -> list[Finding]:
        """The findings of ``severity`` or worse."""
        rank = severity_rank(severity)
        return [f for f in self.findings if severity_rank(f.severity) >= rank]

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def find(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def exit_code(self, fail_on: str = "warning") -> int:
        """1 when a finding at or above ``fail_on`` exists, else 0 (the CLI's exit code)."""
        return 1 if self.at_least(fail_on) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "seconds": round(self.seconds, 3),
            "findings": [f.to_dict() for f in self.findings],
            "layers": [s.to_dict() for s in self.layers],
            "metrics": {k: _json_number(v) if isinstance(v, float) else v
                        for k, v in self.metrics.items()},
            "unreached_in_eval": list(self.unreached),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ------------------------------------------------------------------ terminal

    def format_table(self, width: int = 150) -> str:
        """The findings as a text table: severity, layer, finding, evidence, fix."""
        head = f"bnlab doctor: {self.model}"
        head += f" on {self.data}" if self.data else " (static checks only: no data given)"
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        lines = [head, f"{summary} ({self.seconds:.1f} s)"]
        if not self.findings:
            lines.append("no findings")
            return "\n".join(lines)
        cols = ("severity", "layer", "finding", "evidence", "fix")
        avail = max(width - 8 - 4 * 3, 60)
        widths = [8, max(12, avail * 18 // 100), max(14, avail * 24 // 100),
                  max(16, avail * 34 // 100), max(14, avail * 24 // 100)]
        sep = "-+-".join("-" * w for w in widths)
        lines += [sep, " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), sep]
        order = sorted(self.findings, key=lambda f: -severity_rank(f.severity))
        for f in order:
            layer = ", ".join(f.layers) if f.layers else "(model)"
            evidence = f.evidence
            if f.effect:
                evidence += " " + format_effect(f.effect)
            cells = [f.severity, layer, f.title, evidence, f.fix]
            wrapped = [textwrap.wrap(c, w, break_long_words=True) or [""]
                       for c, w in zip(cells, widths, strict=True)]
            for i in range(max(len(w) for w in wrapped)):
                lines.append(" | ".join((w[i] if i < len(w) else "").ljust(wd)
                                        for w, wd in zip(wrapped, widths, strict=True)))
            lines.append(sep)
        return "\n".join(lines)

    # ------------------------------------------------------------------ HTML

    def to_html(self) -> str:
        """A self-contained page (the plot embedded as a base64 PNG)."""
        e = html.escape
        colour = {"info": "#4a7ab0", "warning": "#c77c02", "error": "#c0392b"}
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>bnlab doctor: {e(self.model)}</title><style>",
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
            "table{border-collapse:collapse;width:100%;margin:1em 0}",
            "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}",
            "td:first-child{white-space:nowrap}",
            "th{background:#f0f0f0;text-align:left}code{font-size:13px}",
            ".sev{color:#fff;border-radius:3px;padding:1px 6px;font-weight:bold}",
            ".small{color:#666;font-size:13px}img{max-width:100%}",
            "</style></head><body>",
            f"<h1>bnlab doctor: {e(self.model)}</h1>",
            f"<p>Data: {e(self.data or 'none (static checks only)')}. "
            f"Time: {self.seconds:.1f} s.</p>",
        ]
        counts = ", ".join(f"{sum(f.severity == s for f in self.findings)} {s}"
                           for s in SEVERITIES)
        parts.append(f"<h2>Findings ({e(counts)})</h2>")
        if self.findings:
            parts.append("<table><tr><th>severity</th><th>layer</th><th>finding</th>"
                         "<th>evidence</th><th>fix</th></tr>")
            for f in sorted(self.findings, key=lambda f: -severity_rank(f.severity)):
                effect = f" <b>{e(format_effect(f.effect))}</b>" if f.effect else ""
                parts.append(
                    f"<tr><td><span class='sev' style='background:{colour[f.severity]}'>"
                    f"{e(f.severity)}</span></td><td>{e(', '.join(f.layers) or '(model)')}"
                    f"</td><td>{e(f.title)}</td><td>{e(f.evidence)}{effect}</td>"
                    f"<td><code>{e(f.fix)}</code></td></tr>")
            parts.append("</table>")
        else:
            parts.append("<p>No findings.</p>")
        parts.append("<h2>Statistics gap per BN layer</h2>")
        png = self.gap_plot_png()
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='statistics gap per layer' src='data:image/png;base64,"
                         f"{data}'>")
            parts.append(
                "<p class='small'>Gap: per channel, the 2-Wasserstein distance between "
                "N(running_mean, running_var) and the population N(mean, var) of the layer's "
                "input on the data (as <code>recalibrate_bn</code> would set it), in units of "
                "the population standard deviation; bars: mean over channels, dots: max.</p>")
        else:
            parts.append("<p class='small'>Not measured (no data given).</p>")
        parts.append("<h2>Layers</h2><table><tr>")
        cols = ("name", "kind", "num_features", "momentum", "eps", "tracked", "training",
                "calls_per_forward", "values_per_channel", "gap_mean", "gap_max",
                "dropout_var_ratio")
        parts.append("".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for s in self.layers:
            d = dataclasses.asdict(s)
            parts.append("<tr>" + "".join(f"<td>{e(_fmt(d[c]))}</td>" for c in cols)
                         + "</tr>")
        parts.append("</table>")
        if self.metrics:
            parts.append("<h2>Measurements</h2><table>")
            for k, v in self.metrics.items():
                parts.append(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>")
            parts.append("</table>")
        if self.unreached:
            parts.append("<p class='small'>Not reached in eval mode (not checked against "
                         f"data): {e(', '.join(self.unreached))}.</p>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def gap_plot_png(self) -> bytes | None:
        rows = [s for s in self.layers if s.gap_mean is not None]
        if not rows:
            return None
        from bnlab._plot import png_bytes, subplots

        with subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 3.6), dpi=100) as (fig, ax):
            xs = list(range(len(rows)))
            finite = [v for s in rows for v in (s.gap_mean, s.gap_max)
                      if v is not None and math.isfinite(v)]
            top = max([GAP_WARN, *finite]) * 1.1
            bad = [i for i, s in enumerate(rows) if not _is_finite(s.gap_mean)]
            means = [_finite_or(s.gap_mean, 0.0) for s in rows]
            maxes = [_finite_or(s.gap_max, top) for s in rows]
            ax.bar(xs, means, color="#4a7ab0", label="mean over channels")
            ax.plot(xs, maxes, "o", color="#c0392b", label="max over channels")
            if bad:
                ax.bar(bad, [top] * len(bad), color="none", edgecolor="#c0392b", hatch="//",
                       label="NaN/Inf statistics")
            ax.set_ylim(0, top * 1.05)
            ax.axhline(GAP_WARN, color="#c77c02", ls="--", lw=1,
                       label=f"warning threshold ({GAP_WARN})")
            ax.set_xticks(xs)
            ax.set_xticklabels([s.name for s in rows], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("gap (population std)")
            ax.set_title("running vs population statistics, per BN layer")
            ax.legend(fontsize=8)
            fig.tight_layout()
            return png_bytes(fig)


GAP_WARN = 0.2
"""Mean per-channel gap (in population standard deviations) above which statistics are stale."""


def _is_finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _finite_or(v: float | None, default: float) -> float:
    return v if v is not None and math.isfinite(v) else default


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_effect(effect: dict[str, list[float]]) -> str:
    """``accuracy 81.20 % -> 96.10 %, loss 0.61 -> 0.13 (after the fix, on the data)``."""
    parts = []
    if "accuracy" in effect:
        a, b = effect["accuracy"]
        parts.append(f"accuracy {100 * a:.2f} % -> {100 * b:.2f} %")
    if "loss" in effect:
        a, b = effect["loss"]
        parts.append(f"loss {a:.4g} -> {b:.4g}")
    return "[fix measured: " + ", ".join(parts) + "]"
