"""The lab's results folder: its layout, its manifests, and every read and write in it.

Layout of an ``--out`` folder::

    DIR/lab.json                      bnlab version, profile, dataset (never mixed)
    DIR/NAME/experiment.json          the experiment's full config and its run ids
    DIR/NAME/runs/<hash>/config.json  the run's identity (written first)
    DIR/NAME/runs/<hash>/metrics.jsonl
    DIR/NAME/runs/<hash>/summary.json written LAST: its presence means the run is complete
    DIR/NAME/runs/<hash>/error.txt    only if the run failed
    DIR/NAME/result.json, NAME.csv, *.png

A run folder without ``summary.json`` (killed mid-run) is redone from scratch. Every file
is written to a temporary name and renamed (:mod:`bnlab._io`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bnlab import __version__
from bnlab._io import atomic_write_json, atomic_write_text
from bnlab._lock import LOCK_FILE
from bnlab.errors import BnlabError
from bnlab.experiments.base import Experiment, RunOutput, RunResult, RunSpec

LAB_MANIFEST = "lab.json"
EXP_MANIFEST = "experiment.json"
RESULT = "result.json"


class CorruptRun(Exception):
    """A run folder whose files cannot be read back; the run is redone."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class PlannedRun:
    spec: RunSpec
    run_id: str
    run_dir: Path


@dataclass
class PlannedExperiment:
    experiment: Experiment
    cfg: Any
    dir: Path
    runs: list[PlannedRun]

    def manifest(self, profile: str, dataset: str) -> dict[str, Any]:
        """As it reads back from JSON (tuples become lists), so that it compares equal."""
        return _json_roundtrip({
            "name": self.experiment.name,
            "profile": profile,
            "dataset": dataset,
            "bnlab_version": __version__,
            "config": asdict(self.cfg),
            "runs": [r.run_id for r in self.runs],
        })


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- manifests


def _check_manifest(path: Path, expected: dict[str, Any], force: bool, what: str) -> bool:
    """True if ``path`` is absent or matches; with a mismatch: BnlabError, or False (force).

    An experiment's manifest matches when everything but its ``config`` is equal: the run
    ids already cover every input of every run, and the analysis is redone from the runs
    on each invocation, so a config that plans the same runs (rewritten in another form,
    or with other analysis settings) reuses them.
    """
    if not path.exists():
        return True
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if force:
            return False
        raise BnlabError(
            f"corrupted result file {path} ({exc}); rerun with --force to discard that "
            f"folder's results, or choose another --out"
        ) from None
    keys = [k for k in expected if k != "config"]
    if isinstance(found, dict) and all(found.get(k) == expected[k] for k in keys):
        return True
    if force:
        return False
    diffs = [
        f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now"
        for k in expected
        if isinstance(found, dict) and found.get(k) != expected.get(k) and k not in
        ("runs", "config")
    ] or ["a different set of runs"]
    raise BnlabError(
        f"{path.parent} holds {what} results of a different configuration "
        f"({'; '.join(diffs[:3])}); refusing to mix them. Use another --out, or --force to "
        f"discard the old results"
    )


def prepare_out(out: Path, planned: list[PlannedExperiment], profile: str, dataset: str,
                force: bool, known: Iterable[str]) -> None:
    """Check (or, with ``force``, clear) what ``out`` holds and write the manifests.

    ``known`` are every experiment's names: a lab manifest of another profile, dataset or
    version discards all their folders (with ``force``)."""
    lab = {"bnlab_version": __version__, "profile": profile, "dataset": dataset}
    manifest = out / LAB_MANIFEST
    if out.exists() and not out.is_dir():
        raise BnlabError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) \
            and not manifest.exists() and not force:
        raise BnlabError(
            f"--out {out} is not empty and holds no bnlab lab results ({LAB_MANIFEST} "
            f"missing); choose an empty or new folder, or --force to write there anyway"
        )
    if not _check_manifest(manifest, lab, force, "lab"):
        for name in known:
            shutil.rmtree(out / name, ignore_errors=True)
        for f in ("report.md", "report.html", LAB_MANIFEST):
            (out / f).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, lab)
    except OSError as exc:
        raise BnlabError(f"--out {out} is not writable ({exc})") from None
    for p in planned:
        expected = p.manifest(profile, dataset)
        if not _check_manifest(p.dir / EXP_MANIFEST, expected, force, p.experiment.name):
            shutil.rmtree(p.dir, ignore_errors=True)
        atomic_write_json(p.dir / EXP_MANIFEST, expected)


# --------------------------------------------------------------------------- runs


def load_run(run: PlannedRun) -> RunResult | None:
    """The completed run, ``None`` if it is not complete; :class:`CorruptRun` if broken.

    The run folder is read by :func:`bnlab.train.runfiles.read_run`; the lab's own
    ``config.json`` must name this run."""
    from bnlab.train.runfiles import RunFileError, read_run

    config_path = run.run_dir / "config.json"
    try:
        files = read_run(run.run_dir)
        if files is None:
            return None
        config = json.loads(config_path.read_text(encoding="utf-8")) \
            if config_path.is_file() else None
    except RunFileError as exc:
        raise CorruptRun(exc.path, exc.reason) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRun(config_path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("run_id") != run.run_id:
        raise CorruptRun(config_path, "missing or for another run")
    return RunResult(run.spec, run.run_id, files.summary, files.metrics)


def load_runs(p: PlannedExperiment) -> list[RunResult]:
    """Every run of ``p``, all complete (a RuntimeError names the first that is not)."""
    results = []
    for run in p.runs:
        r = load_run(run)
        if r is None:
            raise RuntimeError(f"run {run.run_dir} is not complete")
        results.append(r)
    return results


def begin_run(run: PlannedRun, experiment: str) -> None:
    """A fresh folder for ``run`` (an incomplete one, killed mid-run, is discarded) with its
    identity in ``config.json``."""
    shutil.rmtree(run.run_dir, ignore_errors=True)
    run.run_dir.mkdir(parents=True)
    atomic_write_json(run.run_dir / "config.json",
                      {"run_id": run.run_id, **run.spec.identity(experiment)})


def write_run_files(run_dir: Path, output: RunOutput) -> None:
    """The run's files, through :func:`bnlab.train.runfiles.write_run` (``summary.json``
    last: its presence means the run is complete)."""
    from bnlab.train.runfiles import write_run

    write_run(run_dir, output.metrics, output.summary)


def write_error(run: PlannedRun, text: str) -> None:
    atomic_write_text(run.run_dir / "error.txt", text)


# --------------------------------------------------------------------------- results


def previous_elapsed(p: PlannedExperiment) -> float | None:
    """The wall time recorded by the invocation that wrote ``p``'s result, if any."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return float(json.loads((p.dir / RESULT).read_text())["elapsed_s"])
    return None


def write_result(p: PlannedExperiment, result: dict[str, Any],
                 table: list[dict[str, Any]]) -> None:
    """``NAME.csv`` (the table) and ``result.json``."""
    atomic_write_text(p.dir / result["csv"], rows_to_csv(table))
    atomic_write_json(p.dir / RESULT, result)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in cols})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


def read_results(folder: str | Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """Every ``NAME/result.json`` under ``folder`` for ``names``, in that order."""
    root = Path(folder)
    if not root.is_dir():
        raise BnlabError(f"{root} is not a folder; expected the --out folder of "
                         f"'bnlab experiment'")
    results = []
    order = list(names)
    for name in order:
        path = root / name / RESULT
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BnlabError(
                f"corrupted result file {path} ({exc}); rerun 'bnlab experiment run {name} "
                f"--out {root}' to recompute it"
            ) from None
        if not isinstance(data, dict) or not {"verdict", "claim", "table"} <= set(data):
            raise BnlabError(f"corrupted result file {path}: not an experiment result; rerun "
                             f"'bnlab experiment run {name} --out {root}'")
        results.append(data)
    if not results:
        raise BnlabError(
            f"no experiment results in {root} (no NAME/result.json for any of: "
            f"{', '.join(order)}); run 'bnlab experiment all --out {root}' first"
        )
    return results
