"""``bnlab report DIR``: a lab results folder as ``report.md`` and a self-contained
``report.html`` (plots embedded as base64 PNG, no network access needed to view it)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from bnlab._io import atomic_write_bytes, atomic_write_text
from bnlab.experiments import experiment_names
from bnlab.experiments.store import read_results

VERDICT_COLORS = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700"}


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``NAME/result.json`` under ``folder``, in the lab's order."""
    return read_results(folder, experiment_names())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) if v else "none"
    return "n/a" if v is None else str(v)


def _time(r: dict[str, Any]) -> str:
    return (f"{r.get('run_time_s', 0.0):.0f} s of run time ({len(r.get('runs', []))} runs), "
            f"{r.get('elapsed_s', 0.0):.0f} s wall clock")


def render_markdown(results: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [
        "# bnlab claims lab: results",
        "",
        f"Profile `{first.get('profile')}`, dataset `{first.get('dataset')}`, bnlab "
        f"{first.get('bnlab_version')}. Every verdict comes from a rule written before the "
        f"runs (shown with each claim). Regenerate with `bnlab experiment all --profile "
        f"{first.get('profile')}` and `bnlab report`.",
        "",
        "| claim | experiment | verdict | headline |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['claim']} | [`{r['name']}`](#{r['name']}) | **{r['verdict']}** | "
                     f"{r.get('headline', '')} |")
    for r in results:
        lines += [
            "", f"## {r['name']}", "",
            f"**Claim** (seeds {r.get('seeds', '')}): {r['claim']}", "",
            f"**Verdict: {r['verdict']}.** {r.get('headline', '')}", "",
            f"**Protocol** (profile `{r.get('profile')}`): {r.get('protocol', '')}", "",
            f"**Rule** (fixed before the runs): {r.get('rule', '')}", "",
            "**Effect:** " + "; ".join(f"{k} = {_fmt(v)}" for k, v in r.get("effect", {}).items()),
            "",
        ]
        table = r.get("table", [])
        if table:
            cols = list(dict.fromkeys(k for row in table for k in row))
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for row in table:
                lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
            lines.append("")
        for note in r.get("notes", []):
            lines += [f"*Note:* {note}", ""]
        for png in r.get("plots", []):
            lines += [f"![{r['name']}: {png}]({r['name']}/{png})", ""]
        lines += [f"Time: {_time(r)}. Numbers: [`{r['name']}/{r.get('csv')}`]"
                  f"({r['name']}/{r.get('csv')}).", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1f2328;line-height:1.45}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.verdict{white-space:nowrap;font-weight:700;padding:.1em .5em;border-radius:.3em;color:#fff}
img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0} section{margin-top:2.5em}
.small{color:#57606a;font-size:.9em}
"""


def render_html(results: list[dict[str, Any]], root: Path) -> str:
    e = html.escape
    first = results[0]

    def badge(v: str) -> str:
        return (f'<span class="verdict" style="background:{VERDICT_COLORS.get(v, "#57606a")}">'
                f"{e(v)}</span>")

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>bnlab claims lab: results</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>bnlab claims lab: results</h1>",
        f"<p class='small'>Profile <code>{e(str(first.get('profile')))}</code>, dataset "
        f"<code>{e(str(first.get('dataset')))}</code>, bnlab {e(str(first.get('bnlab_version')))}"
        f". Every verdict comes from a rule written before the runs.</p>",
        "<table><tr><th>claim</th><th>experiment</th><th>verdict</th><th>headline</th></tr>",
    ]
    for r in results:
        parts.append(f"<tr><td>{e(r['claim'])}</td><td><a href='#{e(r['name'])}'>"
                     f"{e(r['name'])}</a></td><td>{badge(r['verdict'])}</td>"
                     f"<td>{e(r.get('headline', ''))}</td></tr>")
    parts.append("</table>")
    for r in results:
        parts += [
            f"<section id='{e(r['name'])}'><h2>{e(r['name'])} {badge(r['verdict'])}</h2>",
            f"<p><b>Claim</b> (seeds {e(str(r.get('seeds', '')))}): {e(r['claim'])}</p>",
            f"<p><b>Result:</b> {e(r.get('headline', ''))}</p>",
            f"<p><b>Protocol</b> (profile <code>{e(str(r.get('profile')))}</code>): "
            f"{e(r.get('protocol', ''))}</p>",
            f"<p><b>Rule</b> (fixed before the runs): {e(r.get('rule', ''))}</p>",
            "<p><b>Effect:</b> " + "; ".join(
                f"{e(k)} = {e(_fmt(v))}" for k, v in r.get("effect", {}).items()) + "</p>",
        ]
        table = r.get("table", [])
        if table:
            cols = list(dict.fromkeys(k for row in table for k in row))
            parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
            for row in table:
                parts.append("<tr>" + "".join(f"<td>{e(_fmt(row.get(c)))}</td>" for c in cols)
                             + "</tr>")
            parts.append("</table>")
        for note in r.get("notes", []):
            parts.append(f"<p class='small'><i>Note:</i> {e(note)}</p>")
        for png in r.get("plots", []):
            path = root / r["name"] / png
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                parts.append(f"<img alt='{e(png)}' src='data:image/png;base64,{data}'>")
            else:
                parts.append(f"<p class='small'>(plot {e(png)} missing)</p>")
        parts.append(f"<p class='small'>Time: {e(_time(r))}.</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for the results in ``folder``.

    With ``out`` (e.g. ``docs/results``), the report goes there together with copies of
    each experiment's ``result.json``, CSV and PNGs (not the per-run files), so it can be
    committed on its own.
    """
    root = Path(folder)
    results = load_results(root)
    dest = Path(out) if out is not None else root
    if dest.resolve() != root.resolve():
        for r in results:
            for f in ["result.json", r.get("csv"), *r.get("plots", [])]:
                if f and (root / r["name"] / f).is_file():
                    atomic_write_bytes(dest / r["name"] / f, (root / r["name"] / f).read_bytes())
    md, page = dest / "report.md", dest / "report.html"
    atomic_write_text(md, render_markdown(results))
    atomic_write_bytes(page, render_html(results, root).encode("utf-8"))
    return md, page
