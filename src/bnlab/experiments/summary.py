"""Several lab folders side by side: one cell per (profile, dataset), contradictions,
transfer between datasets, ``verdicts.json`` and the README's generated headlines.

A lab folder (``bnlab experiment ... --out DIR``) holds one profile on one dataset; its
results say which (``result.json``'s ``profile`` and ``dataset``). A *cell* is one of
them, named ``"profile/dataset"`` (e.g. ``"full/fashion-mnist"``). For each experiment:

- a **contradiction** is a dataset on which one profile says ``supported`` and another
  ``not supported`` (``inconclusive`` contradicts nothing);
- it **transfers** when the ``full`` profile gives the same verdict on every dataset it
  ran (it needs two datasets in ``full`` to say so).

The experiment's declaration (quote, section, papers, literature, practice) is read from
``result.json``; a result written before those fields existed takes them from the live
declaration, or leaves them empty for an experiment that is no longer registered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.errors import BnlabError
from bnlab.experiments import experiment_names, get_experiment
from bnlab.experiments.base import PROFILES
from bnlab.experiments.store import LAB_MANIFEST, RESULT, read_results

DATASET_ORDER: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")
SECTIONS: tuple[tuple[str, str], ...] = (("claim", "Seed claims"), ("literature", "Literature"))
README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
_DECLARED = ("seeds", "quote", "section", "papers", "literature", "practice")


def seeds_text(seeds: str) -> str:
    """``"seeds 000, 001"`` for seed documents' numbers; other wording as it is."""
    return f"seeds {seeds}" if seeds[:1].isdigit() else seeds


def _order(values: tuple[str, ...], value: str) -> tuple[int, str]:
    return (values.index(value) if value in values else len(values), value)


@dataclass(frozen=True)
class Lab:
    """The results of one lab folder: one profile on one dataset.

    ``root`` is where the folder's ``NAME/`` subfolders (result.json, CSV, plots) are.
    """

    profile: str
    dataset: str
    root: Path
    results: dict[str, dict[str, Any]]

    @property
    def key(self) -> str:
        """The cell's name in tables and in ``verdicts.json``: ``profile/dataset``."""
        return f"{self.profile}/{self.dataset}"

    @property
    def slug(self) -> str:
        """The cell's folder name under a report's ``--out``: ``profile-dataset``."""
        return f"{self.profile}-{self.dataset}"

    @property
    def wall_s(self) -> float:
        """The lab's wall time: its experiments ran one after the other."""
        return sum(float(r.get("elapsed_s") or 0.0) for r in self.results.values())

    def sort_key(self) -> tuple[tuple[int, str], tuple[int, str]]:
        return _order(PROFILES, self.profile), _order(DATASET_ORDER, self.dataset)


def load_lab(folder: str | Path) -> Lab:
    """The results in a lab folder (``bnlab experiment``'s ``--out``, or a report's copy
    of one). Every result must be of one profile and one dataset."""
    root = Path(folder)
    results = read_results(root, experiment_names())
    found = {(str(r.get("profile")), str(r.get("dataset"))) for r in results}
    manifest = root / LAB_MANIFEST
    if manifest.is_file():
        try:
            lab = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BnlabError(f"corrupted lab manifest {manifest} ({exc})") from None
        if isinstance(lab, dict):
            found.add((str(lab.get("profile")), str(lab.get("dataset"))))
    if len(found) != 1:
        raise BnlabError(f"{root} mixes results of several profiles or datasets "
                         f"({', '.join(sorted('/'.join(f) for f in found))}); expected one "
                         f"lab folder per profile and dataset")
    [(profile, dataset)] = found
    return Lab(profile, dataset, root, {r["name"]: r for r in results})


def load_labs(folders: Sequence[str | Path]) -> list[Lab]:
    """The labs in several folders (each a lab folder, or a report's ``--out`` holding
    one per profile and dataset: :func:`committed_labs`), in cell order (smoke, quick,
    full; mnist, fashion-mnist, …); two folders of the same profile and dataset are
    refused."""
    labs = sorted((lab for f in folders for lab in committed_labs(f)), key=Lab.sort_key)
    keys = [lab.key for lab in labs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise BnlabError(f"two lab folders hold {', '.join(twice)}; expected one folder per "
                         f"profile and dataset")
    return labs


def committed_labs(root: str | Path) -> list[Lab]:
    """The labs in ``root``: the folder itself when its results lie directly in it (a lab
    folder), else every subfolder with results (a report's ``--out``, e.g.
    ``docs/results/<profile>-<dataset>/NAME/result.json``)."""
    base = Path(root)
    if not base.is_dir():
        raise BnlabError(f"{base} is not a folder; expected the --out folder of "
                         f"'bnlab experiment'")
    names = experiment_names()
    if any((base / n / RESULT).is_file() for n in names):
        return [load_lab(base)]
    subs = [d for d in sorted(base.iterdir())
            if d.is_dir() and any((d / n / RESULT).is_file() for n in names)]
    if subs:
        return sorted((load_lab(d) for d in subs), key=Lab.sort_key)
    return [load_lab(base)]  # its error names what is missing


@dataclass
class Entry:
    """One experiment across the labs: its declaration and its result per cell."""

    name: str
    claim: str
    seeds: str
    quote: str
    section: str
    papers: str
    literature: str
    practice: dict[str, str]
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)

    def contradictions(self) -> list[str]:
        """The datasets on which one profile says supported and another not supported."""
        out = []
        for dataset in sorted({k.split("/", 1)[1] for k in self.cells},
                              key=lambda d: _order(DATASET_ORDER, d)):
            verdicts = {r["verdict"] for k, r in self.cells.items()
                        if k.split("/", 1)[1] == dataset}
            if {"supported", "not supported"} <= verdicts:
                out.append(dataset)
        return out

    def contradiction_lines(self) -> list[str]:
        lines = []
        for dataset in self.contradictions():
            said = ", ".join(f"{k.split('/', 1)[0]} {r['verdict']}"
                             for k, r in self.cells.items() if k.split("/", 1)[1] == dataset)
            lines.append(f"contradiction: {self.name} on {dataset}: {said}")
        return lines

    def transfers(self) -> str:
        """``"yes"``/``"no"``: the same full-profile verdict on every dataset it ran;
        ``"n/a"`` with fewer than two datasets in ``full``."""
        full = [r["verdict"] for k, r in self.cells.items() if k.startswith("full/")]
        if len(full) < 2:
            return "n/a"
        return "yes" if len(set(full)) == 1 else "no"

    def practice_cell(self) -> str | None:
        """The cell whose verdict the practice sentence speaks for: full/mnist when it
        exists, else the first full cell, else the last (largest-profile) one."""
        if not self.cells:
            return None
        if "full/mnist" in self.cells:
            return "full/mnist"
        full = [k for k in self.cells if k.startswith("full/")]
        return full[0] if full else list(self.cells)[-1]

    def practice_sentence(self) -> str:
        cell = self.practice_cell()
        if cell is None:
            return ""
        return self.practice.get(self.cells[cell]["verdict"], "")

    def source(self) -> str:
        """What the claim rests on, for tables: the seed documents, else the paper."""
        if self.section == "literature" and self.papers:
            return self.papers
        if self.seeds:
            return seeds_text(self.seeds)
        return self.papers


def _declaration(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The declared fields of ``name``: from the result, else from the live declaration,
    else empty."""
    missing = [f for f in _DECLARED if f not in result]
    live: dict[str, Any] = {}
    if missing:
        try:
            exp = get_experiment(name)
        except ValueError:
            exp = None
        if exp is not None:
            live = {f: getattr(exp, f) for f in missing}
    empty: dict[str, Any] = {"section": "claim", "practice": {}}
    return {f: result.get(f, live.get(f, empty.get(f, ""))) for f in _DECLARED}


def entries(labs: list[Lab]) -> list[Entry]:
    """One entry per experiment found in any lab, in the lab's order (seed claims, then
    the literature); its cells in the labs' order."""
    order = experiment_names()
    names = sorted({n for lab in labs for n in lab.results},
                   key=lambda n: order.index(n) if n in order else len(order))
    out = []
    for name in names:
        cells = {lab.key: lab.results[name] for lab in labs if name in lab.results}
        latest = list(cells.values())[-1]
        decl = _declaration(name, latest)
        section = decl["section"] if decl["section"] in dict(SECTIONS) else "claim"
        out.append(Entry(name=name, claim=str(latest.get("claim", "")),
                         seeds=str(decl["seeds"] or ""), quote=str(decl["quote"] or ""),
                         section=section, papers=str(decl["papers"] or ""),
                         literature=str(decl["literature"] or ""),
                         practice=dict(decl["practice"] or {}), cells=cells))
    return sorted(out, key=lambda e: [s for s, _ in SECTIONS].index(e.section))


def contradiction_lines(items: list[Entry]) -> list[str]:
    return [line for e in items for line in e.contradiction_lines()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def verdicts(items: list[Entry]) -> dict[str, Any]:
    """``verdicts.json``: experiment -> section, seeds, papers, each cell's verdict,
    headline and effect, whether the claim transfers, and whether it contradicts."""
    return {
        e.name: {
            "section": e.section,
            "claim": e.claim,
            "seeds": e.seeds,
            "papers": e.papers,
            "cells": {k: {"verdict": r["verdict"], "headline": r.get("headline", ""),
                          "effect": _jsonable(r.get("effect", {}))}
                      for k, r in e.cells.items()},
            "transfers": e.transfers(),
            "contradiction": bool(e.contradictions()),
        }
        for e in items
    }


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def readme_block(labs: list[Lab], report_link: str) -> str:
    """The README's generated results: the labs and their wall time, a table of the
    experiments (name, claim, seeds or paper) and one headline line per claim with its
    verdict per cell and the full profile's interval (else the largest profile's)."""
    items = entries(labs)
    keys = [lab.key for lab in labs]
    lines = [
        f"Generated by `bnlab report` from the committed results ([report]({report_link})); "
        "do not edit by hand.",
        "",
        "| lab | experiments | wall time (sum of `elapsed_s`) | bnlab |",
        "|---|---|---|---|",
    ]
    for lab in labs:
        version = sorted({str(r.get("bnlab_version")) for r in lab.results.values()})
        lines.append(f"| `{lab.key}` | {len(lab.results)} | {_minutes(lab.wall_s)} | "
                     f"{', '.join(version)} |")
    lines += ["", "| experiment | claim | seeds or paper | " + " | ".join(keys)
              + " | transfers |", "|---" * (4 + len(keys)) + "|"]
    for e in items:
        cells = " | ".join(e.cells[k]["verdict"] if k in e.cells else "—" for k in keys)
        lines.append(f"| `{e.name}` | {_cell(e.claim)} | {_cell(e.source())} | {cells} | "
                     f"{e.transfers()} |")
    lines.append("")
    for e in items:
        said = ", ".join(f"`{k}` **{r['verdict']}**" for k, r in e.cells.items())
        full = [k for k in e.cells if k.startswith("full/")]
        shown = full or [list(e.cells)[-1]]
        heads = " ".join(f"*{k}:* {e.cells[k].get('headline', '')}" for k in shown)
        flag = " **Contradiction between profiles.**" if e.contradictions() else ""
        lines.append(f"- **{e.name}**: {said}.{flag} {heads}".rstrip())
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str, where: str = "README") -> str:
    """``text`` with what lies between the results markers replaced by ``block``."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise BnlabError(f"{where} has no '{README_BEGIN}' … '{README_END}' block to replace; "
                         f"add the two markers where the results go")
    return text[:begin + len(README_BEGIN)] + "\n" + block + text[end:]


def readme_results(text: str) -> str | None:
    """The generated block of a README (``None`` without the markers)."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return None
    return text[begin + len(README_BEGIN):end].removeprefix("\n")


def listing() -> list[str]:
    """``bnlab experiment list``: the seed claims, then the literature, one line each with
    the claim and its seed documents (a literature experiment: its paper)."""
    exps = [get_experiment(n) for n in experiment_names()]
    width = max((len(e.name) for e in exps), default=0) + 2
    lines = []
    for section, title in SECTIONS:
        group = [e for e in exps if e.section == section]
        if not group:
            continue
        lines.append(f"{title}:")
        for e in group:
            if section == "literature":
                source = e.papers + (f"; {seeds_text(e.seeds)}" if e.seeds else "")
            else:
                source = seeds_text(e.seeds) if e.seeds else "no seed named"
            lines.append(f"  {e.name:<{width}}{e.claim} ({source})")
    return lines
