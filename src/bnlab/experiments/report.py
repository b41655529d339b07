"""``bnlab report DIR [DIR ...]``: lab results folders as one ``report.md``, one
self-contained ``report.html`` (plots embedded as base64 PNG, no network access needed to
view it) and a machine-readable ``verdicts.json``.

Each DIR is one profile on one dataset (:mod:`bnlab.experiments.summary`); the report
puts them side by side: per experiment the seed documents' words, the verdict per
(profile, dataset), whether it transfers between datasets, the literature's result beside
the lab's, what the verdict means in practice, and per lab its protocol, rule, numbers and
plots. Contradictions between profiles on one dataset get their own section at the top.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab._io import atomic_write_bytes, atomic_write_text
from bnlab.errors import BnlabError
from bnlab.experiments.summary import (
    SECTIONS,
    Entry,
    Lab,
    contradiction_lines,
    entries,
    load_labs,
    readme_block,
    replace_block,
    seeds_text,
    verdicts,
)

VERDICT_COLORS = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700"}
TITLE = "bnlab claims lab: results"


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


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class Layout:
    """Where the report goes and where each lab's files are, relative to it."""

    dest: Path
    roots: dict[str, Path]  # lab key -> the folder holding its NAME/ subfolders

    def link(self, lab: Lab, name: str, file: str) -> str:
        return Path(os.path.relpath(self.roots[lab.key] / name / file, self.dest)).as_posix()

    def path(self, lab: Lab, name: str, file: str) -> Path:
        return self.roots[lab.key] / name / file


def _intro(labs: list[Lab]) -> list[str]:
    out = []
    for lab in labs:
        version = ", ".join(sorted({str(r.get("bnlab_version")) for r in lab.results.values()}))
        out.append(f"`{lab.key}`: profile `{lab.profile}`, dataset `{lab.dataset}`, bnlab "
                   f"{version}, {len(lab.results)} experiment{'s' * (len(lab.results) != 1)}, "
                   f"{lab.wall_s / 60:.1f} min wall "
                   f"time (the sum of their `elapsed_s`)")
    return out


def _transfers(e: Entry) -> str:
    t = e.transfers()
    return "n/a (needs the `full` profile on two datasets)" if t == "n/a" else t


_NO_CONTRADICTION = ("None: no experiment is `supported` in one profile and `not supported` "
                     "in another on the same dataset.")


# --------------------------------------------------------------------------- markdown


def _md_summary(items: list[Entry], keys: list[str]) -> list[str]:
    lines: list[str] = []
    for section, title in SECTIONS:
        group = [e for e in items if e.section == section]
        if not group:
            continue
        lines += ["", f"### {title}", "",
                  "| claim | experiment | " + " | ".join(keys) + " | transfers | "
                  + ("seeds" if section == "claim" else "paper") + " |",
                  "|---" * (len(keys) + 4) + "|"]
        for e in group:
            cells = " | ".join(f"**{e.cells[k]['verdict']}**" if k in e.cells else "—"
                               for k in keys)
            flag = " (contradiction)" if e.contradictions() else ""
            lines.append(f"| {_md_cell(e.claim)} | [`{e.name}`](#{e.name}){flag} | {cells} | "
                         f"{e.transfers()} | {_md_cell(e.source())} |")
    return lines


def _md_entry(e: Entry, labs: list[Lab], layout: Layout) -> list[str]:
    lines = ["", f"## {e.name}", ""]
    if e.quote:
        lines += [f"> {line}" if line else ">" for line in e.quote.splitlines()] + [""]
    what = seeds_text(e.seeds) if e.seeds else ""
    if e.papers:
        what = f"{what}; {e.papers}" if what else e.papers
    lines += [f"**Claim**{f' ({what})' if what else ''}: {e.claim}", "",
              "| profile/dataset | verdict | result |", "|---|---|---|"]
    for k, r in e.cells.items():
        lines.append(f"| `{k}` | **{r['verdict']}** | {_md_cell(r.get('headline', ''))} |")
    lines += ["", f"**Transfers between datasets** (the same `full` verdict on each): "
                  f"{_transfers(e)}.", ""]
    lines += [f"**Contradiction between profiles:** {line.removeprefix('contradiction: ')}."
              for line in e.contradiction_lines()] + ([""] if e.contradictions() else [])
    if e.literature or e.papers:
        lab_side = "<br>".join(f"`{k}` **{r['verdict']}**: {_md_cell(r.get('headline', ''))}"
                               for k, r in e.cells.items())
        paper = _md_cell(e.literature or "(no result declared)")
        lines += [f"| the literature ({_md_cell(e.papers or 'papers not named')}) | this lab |",
                  "|---|---|", f"| {paper} | {lab_side} |", ""]
    practice, cell = e.practice_sentence(), e.practice_cell()
    if practice and cell is not None:
        lines += [f"**In practice** (`{cell}`: {e.cells[cell]['verdict']}): {practice}", ""]
    lines += [line for lab in labs if e.name in lab.results
              for line in _md_lab(e.name, lab.results[e.name], lab, layout)]
    return lines


def _md_lab(name: str, r: dict[str, Any], lab: Lab, layout: Layout) -> list[str]:
    lines = [f"### {name}: {lab.key}", "",
             f"**Verdict: {r['verdict']}.** {r.get('headline', '')}", "",
             f"**Protocol** (profile `{lab.profile}`, dataset `{lab.dataset}`): "
             f"{r.get('protocol', '')}", "",
             f"**Rule** (fixed before the runs): {r.get('rule', '')}", "",
             "**Effect:** " + "; ".join(f"{k} = {_fmt(v)}" for k, v in r.get("effect", {}).items()),
             ""]
    table = r.get("table", [])
    if table:
        cols = list(dict.fromkeys(k for row in table for k in row))
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in table:
            lines.append("| " + " | ".join(_md_cell(_fmt(row.get(c))) for c in cols) + " |")
        lines.append("")
    for note in r.get("notes", []):
        lines += [f"*Note:* {note}", ""]
    for png in r.get("plots", []):
        lines += [f"![{name}: {png}]({layout.link(lab, name, png)})", ""]
    csv = r.get("csv")
    numbers = f" Numbers: [`{name}/{csv}`]({layout.link(lab, name, csv)})." if csv else ""
    lines += [f"Time: {_time(r)}.{numbers}", ""]
    return lines


def render_markdown(labs: list[Lab], layout: Layout) -> str:
    items = entries(labs)
    keys = [lab.key for lab in labs]
    lines = [f"# {TITLE}", "",
             "Every verdict comes from a rule written before the runs (shown with each claim, "
             "per profile). The labs in this report:", ""]
    lines += [f"- {line}" for line in _intro(labs)]
    lines += ["", "Regenerate with `bnlab experiment all --profile P --dataset D --out DIR` "
              "per lab and `bnlab report DIR [DIR ...]`.", "",
              "## Contradictions between profiles", ""]
    found = contradiction_lines(items)
    lines += [f"- {line}" for line in found] if found else [_NO_CONTRADICTION]
    lines += ["", "## Summary", *_md_summary(items, keys)]
    for e in items:
        lines += _md_entry(e, labs, layout)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1.2em;color:#1f2328;line-height:1.5;font-size:16px}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:0}
h3{margin-top:1.6em;color:#24292f} h4{margin:.2em 0 .4em;font-size:.95em;color:#57606a;
text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.verdict{white-space:nowrap;font-weight:700;padding:.1em .5em;border-radius:.3em;color:#fff;
font-size:.85em;display:inline-block;margin:.1em 0}
h2 .verdict{font-size:.5em;vertical-align:middle}
.verdict .cell{font-weight:400;opacity:.9;font-family:ui-monospace,monospace}
td.name{white-space:nowrap}
img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0;display:block}
section{margin-top:3em;padding-top:.5em}
.small{color:#57606a;font-size:.9em}
blockquote{margin:.8em 0;padding:.4em 1em;border-left:4px solid #8c959f;background:#f6f8fa;
font-style:italic}
.vs{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin:1em 0}
.vs>div{border:1px solid #d0d7de;border-radius:.4em;padding:.6em 1em}
.vs .paper{background:#f6f8fa} .vs .lab{background:#fff8e7}
.vs p{margin:.3em 0}
.practice{border-left:4px solid #0969da;background:#ddf4ff;padding:.5em 1em;margin:1em 0}
.alert{border:2px solid #cf222e;background:#ffebe9;padding:.5em 1em;border-radius:.4em}
.ok{border:1px solid #1a7f37;background:#dafbe1;padding:.5em 1em;border-radius:.4em}
nav.toc{border:1px solid #d0d7de;border-radius:.4em;padding:.4em 1.2em;background:#f6f8fa}
nav.toc ul{margin:.2em 0 .6em;padding-left:1.2em} nav.toc li{margin:.15em 0}
.cells td:first-child{white-space:nowrap;font-family:ui-monospace,monospace}
.lab-detail{border-top:1px dashed #d0d7de;margin-top:1.5em}
code{background:#eff1f3;padding:0 .25em;border-radius:.2em}
"""


def _badge(v: str, cell: str = "") -> str:
    """A verdict in its colour; with ``cell``, labelled with the lab it comes from."""
    label = f"<span class='cell'>{html.escape(cell)}</span> " if cell else ""
    return (f'<span class="verdict" style="background:{VERDICT_COLORS.get(v, "#57606a")}">'
            f"{label}{html.escape(v)}</span>")


def _html_entry(e: Entry, labs: list[Lab], layout: Layout) -> list[str]:
    esc = html.escape
    badges = " ".join(_badge(r["verdict"], k) for k, r in e.cells.items())
    parts = [f"<section id='{esc(e.name)}'><h2>{esc(e.name)} {badges}</h2>"]
    if e.quote:
        parts.append(f"<blockquote>{esc(e.quote)}</blockquote>")
    what = seeds_text(e.seeds) if e.seeds else ""
    if e.papers:
        what = f"{what}; {e.papers}" if what else e.papers
    parts.append(f"<p><b>Claim</b>{f' ({esc(what)})' if what else ''}: {esc(e.claim)}</p>")
    parts.append("<table class='cells'><tr><th>profile/dataset</th><th>verdict</th>"
                 "<th>result</th></tr>")
    for k, r in e.cells.items():
        parts.append(f"<tr><td>{esc(k)}</td><td>{_badge(r['verdict'])}</td>"
                     f"<td>{esc(r.get('headline', ''))}</td></tr>")
    parts.append("</table>")
    parts.append(f"<p><b>Transfers between datasets</b> (the same <code>full</code> verdict on "
                 f"each): {esc(_transfers(e)).replace('`', '')}.</p>")
    parts += [f"<p class='alert'><b>Contradiction between profiles:</b> "
              f"{esc(line.removeprefix('contradiction: '))}.</p>"
              for line in e.contradiction_lines()]
    if e.literature or e.papers:
        lab_side = "".join(f"<p><code>{esc(k)}</code> {_badge(r['verdict'])} "
                           f"{esc(r.get('headline', ''))}</p>" for k, r in e.cells.items())
        parts.append(
            "<div class='vs'><div class='paper'><h4>The literature</h4>"
            f"<p class='small'>{esc(e.papers or 'papers not named')}</p>"
            f"<p>{esc(e.literature or '(no result declared)')}</p></div>"
            f"<div class='lab'><h4>This lab</h4>{lab_side}</div></div>")
    practice, cell = e.practice_sentence(), e.practice_cell()
    if practice and cell is not None:
        parts.append(f"<p class='practice'><b>In practice</b> (<code>{esc(cell)}</code>: "
                     f"{esc(e.cells[cell]['verdict'])}): {esc(practice)}</p>")
    parts += [part for lab in labs if e.name in lab.results
              for part in _html_lab(e.name, lab.results[e.name], lab, layout)]
    parts.append("</section>")
    return parts


def _html_lab(name: str, r: dict[str, Any], lab: Lab, layout: Layout) -> list[str]:
    esc = html.escape
    parts = [
        f"<div class='lab-detail' id='{esc(name)}-{esc(lab.slug)}'>"
        f"<h3>{esc(lab.key)} {_badge(r['verdict'])}</h3>",
        f"<p><b>Result:</b> {esc(r.get('headline', ''))}</p>",
        f"<p><b>Protocol</b> (profile <code>{esc(lab.profile)}</code>, dataset "
        f"<code>{esc(lab.dataset)}</code>): {esc(r.get('protocol', ''))}</p>",
        f"<p><b>Rule</b> (fixed before the runs): {esc(r.get('rule', ''))}</p>",
        "<p><b>Effect:</b> " + "; ".join(
            f"{esc(k)} = {esc(_fmt(v))}" for k, v in r.get("effect", {}).items()) + "</p>",
    ]
    table = r.get("table", [])
    if table:
        cols = list(dict.fromkeys(k for row in table for k in row))
        parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
        for row in table:
            parts.append("<tr>" + "".join(f"<td>{esc(_fmt(row.get(c)))}</td>" for c in cols)
                         + "</tr>")
        parts.append("</table>")
    for note in r.get("notes", []):
        parts.append(f"<p class='small'><i>Note:</i> {esc(note)}</p>")
    for png in r.get("plots", []):
        path = layout.path(lab, name, png)
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{esc(name)} ({esc(lab.key)}): {esc(png)}' "
                         f"src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p class='small'>(plot {esc(png)} missing)</p>")
    parts.append(f"<p class='small'>Time: {esc(_time(r))}.</p></div>")
    return parts


def render_html(labs: list[Lab], layout: Layout) -> str:
    esc = html.escape
    items = entries(labs)
    keys = [lab.key for lab in labs]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{TITLE}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{TITLE}</h1>",
        "<p class='small'>Every verdict comes from a rule written before the runs (shown "
        "with each claim, per profile). The labs in this report:</p><ul class='small'>",
    ]
    parts += [f"<li>{esc(line).replace('`', '')}</li>" for line in _intro(labs)]
    parts.append("</ul><h2 id='contradictions'>Contradictions between profiles</h2>")
    found = contradiction_lines(items)
    if found:
        parts.append("<div class='alert'><ul>" + "".join(f"<li>{esc(x)}</li>" for x in found)
                     + "</ul></div>")
    else:
        parts.append(f"<p class='ok'>{esc(_NO_CONTRADICTION).replace('`', '')}</p>")
    parts.append("<h2 id='summary'>Summary</h2><nav class='toc'>")
    for section, title in SECTIONS:
        group = [e for e in items if e.section == section]
        if not group:
            continue
        parts.append(f"<h3>{esc(title)}</h3><table><tr><th>claim</th><th>experiment</th>"
                     + "".join(f"<th>{esc(k)}</th>" for k in keys)
                     + f"<th>transfers</th><th>{'seeds' if section == 'claim' else 'paper'}"
                     "</th></tr>")
        for e in group:
            cells = "".join(f"<td>{_badge(e.cells[k]['verdict'])}</td>" if k in e.cells
                            else "<td>—</td>" for k in keys)
            parts.append(f"<tr><td>{esc(e.claim)}</td><td class='name'><a href='#{esc(e.name)}'>"
                         f"{esc(e.name)}</a>{' ⚠' if e.contradictions() else ''}</td>{cells}"
                         f"<td>{esc(e.transfers())}</td>"
                         f"<td>{esc(e.source())}</td></tr>")
        parts.append("</table>")
    parts.append("</nav>")
    for e in items:
        parts += _html_entry(e, labs, layout)
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Report:
    """What :func:`write_labs_report` wrote, and the contradictions it found."""

    markdown: Path
    html: Path
    verdicts: Path
    labs: list[Lab]
    contradictions: list[str]


def _copy_lab(lab: Lab, target: Path) -> None:
    """``result.json``, the CSV and the PNGs of each experiment (not the per-run files)."""
    if target.resolve() == lab.root.resolve():
        return
    for name, r in lab.results.items():
        for f in ["result.json", r.get("csv"), *r.get("plots", [])]:
            if f and (lab.root / name / f).is_file():
                atomic_write_bytes(target / name / f, (lab.root / name / f).read_bytes())


def write_labs_report(folders: Sequence[str | Path], out: str | Path | None = None,
                      readme: str | Path | None = None) -> Report:
    """Write ``report.md``, ``report.html`` and ``verdicts.json`` for the lab folders.

    Without ``out`` (one folder only) they go into that folder, next to its results. With
    ``out`` (e.g. ``docs/results``), each lab's ``result.json``, CSV and PNGs are copied
    to ``out/<profile>-<dataset>/NAME/`` and the report goes to ``out``, so that it can be
    committed on its own. ``readme``: the file whose results block (between
    ``<!-- results:begin -->`` and ``<!-- results:end -->``) is regenerated.
    """
    if not folders:
        raise BnlabError("no lab folder given; expected the --out folder(s) of 'bnlab "
                         "experiment'")
    labs = load_labs(list(folders))
    if out is None:
        if len(labs) > 1:
            raise BnlabError(f"{len(labs)} lab folders need --out (the folder the combined "
                             f"report and the copies of their results go to)")
        dest = labs[0].root
        layout = Layout(dest, {labs[0].key: labs[0].root})
    else:
        dest = Path(out)
        layout = Layout(dest, {lab.key: dest / lab.slug for lab in labs})
    readme_text = None
    if readme is not None:  # read first: a missing file or marker writes nothing
        try:
            readme_text = Path(readme).read_text(encoding="utf-8")
        except OSError as exc:
            raise BnlabError(f"cannot read --readme {readme}: {exc.strerror}") from None
        replace_block(readme_text, "", str(readme))
    if out is not None:
        for lab in labs:
            _copy_lab(lab, layout.roots[lab.key])
    items = entries(labs)
    md, page, vj = dest / "report.md", dest / "report.html", dest / "verdicts.json"
    atomic_write_text(md, render_markdown(labs, layout))
    atomic_write_bytes(page, render_html(labs, layout).encode("utf-8"))
    atomic_write_text(vj, json.dumps(verdicts(items), indent=2) + "\n")
    if readme is not None and readme_text is not None:
        link = Path(os.path.relpath(md, Path(readme).parent)).as_posix()
        atomic_write_text(readme, replace_block(readme_text, readme_block(labs, link),
                                                str(readme)))
    return Report(md, page, vj, labs, contradiction_lines(items))


def write_report(folder: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for one lab folder (see
    :func:`write_labs_report`); returns their paths."""
    written = write_labs_report([folder], out)
    return written.markdown, written.html
