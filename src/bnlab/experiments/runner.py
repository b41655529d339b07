"""The lab's runner: resumable, parallel, lossless.

Layout of an ``--out`` folder::

    DIR/lab.json                      bnlab version, profile, dataset (never mixed)
    DIR/NAME/experiment.json          the experiment's full config and its run ids
    DIR/NAME/runs/<hash>/config.json  the run's identity (written first)
    DIR/NAME/runs/<hash>/metrics.jsonl
    DIR/NAME/runs/<hash>/summary.json written LAST: its presence means the run is complete
    DIR/NAME/result.json, NAME.csv, *.png

Each run executes in a forked child process. ``--jobs N`` keeps N children busy with
``cores // N`` torch threads each. A child dies with its parent (``PR_SET_PDEATHSIG``), so a
SIGKILL of ``bnlab experiment`` loses at most the runs in flight: their folders have no
``summary.json`` and are redone from scratch on the next invocation. Every file is written
to a temporary name and renamed (:mod:`bnlab._io`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bnlab import __version__
from bnlab._environ import environ
from bnlab._io import atomic_write_json, atomic_write_text
from bnlab._lock import LOCK_FILE, folder_lock
from bnlab._progress import Progress
from bnlab.errors import BnlabError
from bnlab.experiments import experiment_names, get_experiment
from bnlab.experiments.base import PROFILES, Experiment, RunResult, RunSpec, preload
from bnlab.train import TrainConfig

LAB_MANIFEST = "lab.json"
EXP_MANIFEST = "experiment.json"


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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(jobs: int) -> int:
    """Threads for each of ``jobs`` parallel runs so that jobs × threads <= cores."""
    return max(1, available_cores() // jobs)


def resolve_names(names: list[str]) -> list[str]:
    valid = experiment_names()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise BnlabError(
            f"unknown experiment {', '.join(map(repr, unknown))}; expected one of: "
            f"{', '.join(valid)}"
        )
    # keep the registry's order, each name once
    return [n for n in valid if n in set(names)]


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise BnlabError(f"unknown profile {profile!r}; expected one of: {', '.join(PROFILES)}")


def plan(names: list[str], profile: str, dataset: str, out: Path) -> list[PlannedExperiment]:
    planned = []
    for name in resolve_names(names):
        exp = get_experiment(name)
        cfg = exp.config(profile)
        runs = []
        seen: set[str] = set()
        for spec in exp.runs(cfg, dataset):
            run_id = spec.run_id(name)
            if run_id in seen:
                raise ValueError(f"experiment {name}: two runs with the same config ({spec})")
            seen.add(run_id)
            runs.append(PlannedRun(spec, run_id, out / name / "runs" / run_id))
        planned.append(PlannedExperiment(exp, cfg, out / name, runs))
    return planned


# --------------------------------------------------------------------------- reading back


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


# --------------------------------------------------------------------------- manifests


def _check_manifest(path: Path, expected: dict[str, Any], force: bool, what: str) -> bool:
    """True if ``path`` is absent or matches; with a mismatch: BnlabError, or False (force)."""
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
    if found == expected:
        return True
    if force:
        return False
    diffs = [
        f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now"
        for k in expected
        if isinstance(found, dict) and found.get(k) != expected.get(k) and k != "runs"
    ] or ["a different set of runs"]
    raise BnlabError(
        f"{path.parent} holds {what} results of a different configuration "
        f"({'; '.join(diffs[:3])}); refusing to mix them. Use another --out, or --force to "
        f"discard the old results"
    )


def prepare_out(out: Path, planned: list[PlannedExperiment], profile: str, dataset: str,
                force: bool) -> None:
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
        for name in experiment_names():
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


def warm_up(pending: list[PlannedRun]) -> None:
    """Train each model of the pending runs for one step here, in the parent, before any
    fork: the first step in a process pays ~1 s of one-time setup (lazy imports, kernel
    selection) that every forked run would otherwise pay again. One thread, so no OpenMP
    pool exists at fork time (a forked child must not inherit one); restored afterwards."""
    import torch

    from bnlab.experiments.base import get_data
    from bnlab.train import train

    seen: dict[str, TrainConfig] = {}
    for run in pending:
        seen.setdefault(run.spec.config.model, run.spec.config)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for config in seen.values():
            tiny = replace(config, steps=1, epochs=None, eval_every=1, eval_subset=10,
                           eval_train=False, train_subset=None, threads=1, batch_size=2)
            train(tiny, out_dir=None, progress=False, data=get_data(config.dataset))
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned runs)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except OSError:
        pass


def _child(exp_name: str, run: PlannedRun, threads: int, show: bool | None) -> None:
    _die_with_parent()
    try:
        import torch

        from bnlab import core

        torch.set_num_threads(threads)
        core.set_num_threads(threads)  # the NumPy core's pool and OpenBLAS (covariate-shift)
        # an incomplete folder (killed mid-run) is redone from scratch
        shutil.rmtree(run.run_dir, ignore_errors=True)
        run.run_dir.mkdir(parents=True)
        atomic_write_json(
            run.run_dir / "config.json",
            {"run_id": run.run_id, **run.spec.identity(exp_name)},
        )
        spec = replace(run.spec, config=replace(run.spec.config, threads=threads))
        get_experiment(exp_name).execute(spec, run.run_dir, show)
        if not (run.run_dir / "summary.json").is_file():
            raise RuntimeError("the run returned without writing summary.json")
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        atomic_write_text(run.run_dir / "error.txt", text)
        if isinstance(exc, BnlabError):
            print(f"run {run.run_id}: error: {exc}", file=sys.stderr)
        else:
            print(f"run {run.run_id} failed:\n{text}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- the lab


@dataclass
class ExperimentOutcome:
    name: str
    verdict: str | None
    elapsed_s: float
    runs_done: int
    runs_total: int
    failed: list[str]


def run_lab(
    names: list[str],
    *,
    profile: str = "quick",
    out: str | Path = "bnlab-lab",
    jobs: int = 1,
    force: bool = False,
    data_dir: str | Path | None = None,
    dataset: str = "mnist",
    progress: bool | None = None,
) -> list[ExperimentOutcome]:
    """Run the experiments ``names`` (resuming what is done) and write their results."""
    check_profile(profile)
    if jobs < 1:
        raise BnlabError(f"--jobs must be a positive whole number, got {jobs}")
    from bnlab.data import DATASETS

    if dataset not in DATASETS:
        raise BnlabError(f"unknown dataset {dataset!r}; expected one of: {', '.join(DATASETS)}")
    out = Path(out)
    planned = plan(names, profile, dataset, out)
    # train() finds the data through the documented lookup order; the children inherit it
    with folder_lock(out, "bnlab experiment"), \
            environ(BNLAB_DATA_DIR=None if data_dir is None else str(Path(data_dir).resolve())):
        prepare_out(out, planned, profile, dataset, force)

        status: dict[str, bool] = {}
        for p in planned:
            for run in p.runs:
                try:
                    status[run.run_id] = load_run(run) is not None
                except CorruptRun as exc:
                    print(f"corrupted result file {exc.path} ({exc.reason}); re-running run "
                          f"{run.run_id}", file=sys.stderr)
                    status[run.run_id] = False
        total = sum(len(p.runs) for p in planned)
        pending_total = sum(not done for done in status.values())
        if pending_total:
            # fail early, with the data module's own message, if the data cannot be found
            preload(dataset, data_dir)
            warm_up([r for p in planned for r in p.runs if not status[r.run_id]
                     and p.experiment.warm_up])

        threads = threads_per_run(jobs)
        show_run = progress if jobs == 1 else False
        outcomes = []
        start = time.monotonic()
        with Progress(total, "lab", enabled=progress, unit="run", position=0) as bar:
            bar.update(total - pending_total)
            for p in planned:
                t0 = time.monotonic()
                todo = [r for r in p.runs if not status[r.run_id]]
                bar.set_postfix(experiment=p.experiment.name)
                failed = _run_pending(p.experiment.name, todo, jobs, threads, show_run, bar)
                verdict = None
                if not failed:
                    verdict = write_results(p, profile, dataset, time.monotonic() - t0,
                                            ran=len(todo))
                outcomes.append(ExperimentOutcome(
                    p.experiment.name, verdict, time.monotonic() - t0,
                    len(p.runs) - len(failed), len(p.runs), failed,
                ))
        print_summary(outcomes, time.monotonic() - start, jobs, threads)
        failed_runs = [f for o in outcomes for f in o.failed]
        if failed_runs:
            raise BnlabError(
                f"{len(failed_runs)} run(s) failed; see error.txt in: " + ", ".join(failed_runs[:5])
            )
        return outcomes


def _run_pending(exp_name: str, todo: list[PlannedRun], jobs: int, threads: int,
                 show: bool | None, bar: Progress) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    queue = deque(todo)
    active: dict[Any, PlannedRun] = {}
    failed: list[str] = []
    try:
        while queue or active:
            while queue and len(active) < jobs:
                run = queue.popleft()
                proc = ctx.Process(target=_child, args=(exp_name, run, threads, show),
                                   name=f"bnlab-run-{run.run_id}")
                proc.start()
                active[proc] = run
                bar.set_postfix(experiment=exp_name,
                                running=" | ".join(f"{r.spec.label()}, seed={r.spec.seed}"
                                                   for r in active.values()))
            ready = multiprocessing.connection.wait([p.sentinel for p in active], timeout=5.0)
            for proc in [p for p in active if p.sentinel in ready]:
                proc.join()
                run = active.pop(proc)
                if proc.exitcode == 0:
                    bar.update(1)
                else:
                    failed.append(str(run.run_dir))
    finally:
        for proc in active:
            proc.kill()
            proc.join()
    return failed


def write_results(p: PlannedExperiment, profile: str, dataset: str, elapsed_s: float,
                  ran: int = 0) -> str:
    """Analyse a complete experiment and write result.json, NAME.csv and the plots.

    ``elapsed_s`` is this invocation's wall time; when it ran no run (all were done), the
    wall time of the invocation that did is kept from the previous result.json."""
    exp = p.experiment
    if ran == 0:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            elapsed_s = float(json.loads((p.dir / "result.json").read_text())["elapsed_s"])
    results = []
    for run in p.runs:
        r = load_run(run)
        if r is None:
            raise RuntimeError(f"run {run.run_dir} is not complete")
        results.append(r)
    analysis = exp.analyse(p.cfg, results)
    csv_name = f"{exp.name}.csv"
    atomic_write_text(p.dir / csv_name, rows_to_csv(analysis.table))
    import matplotlib

    matplotlib.use("Agg")
    plots = exp.plot(p.cfg, results, p.dir)
    run_time = sum(float(r.summary.get("wall_time_s", 0.0) or 0.0) for r in results)
    result = {
        "name": exp.name,
        "claim": exp.claim,
        "seeds": exp.seeds,
        "protocol": exp.protocol(p.cfg),
        "rule": exp.rule,
        "verdict": analysis.verdict,
        "headline": analysis.headline,
        "effect": analysis.effect,
        "table": analysis.table,
        "notes": analysis.notes,
        "profile": profile,
        "dataset": dataset,
        "bnlab_version": __version__,
        "config": asdict(p.cfg),
        "runs": [
            {"id": r.run_id, "group": r.spec.group, "seed": r.spec.seed,
             "wall_time_s": r.summary.get("wall_time_s")}
            for r in results
        ],
        "run_time_s": run_time,
        "elapsed_s": elapsed_s,
        "csv": csv_name,
        "plots": plots,
    }
    atomic_write_json(p.dir / "result.json", result)
    return analysis.verdict


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


def print_summary(outcomes: list[ExperimentOutcome], total_s: float, jobs: int,
                  threads: int) -> None:
    print(f"\n{'experiment':<18} {'runs':>9} {'time':>9}  verdict")
    for o in outcomes:
        verdict = o.verdict or f"FAILED ({len(o.failed)} run(s))"
        print(f"{o.name:<18} {o.runs_done:>4}/{o.runs_total:<4} {o.elapsed_s:>8.1f}s  {verdict}")
    print(f"{'total':<18} {'':>9} {total_s:>8.1f}s  (--jobs {jobs}, {threads} thread(s) per run)")
