"""The lab's runner: plan the runs, do what is not done yet, analyse, write the results.

Resumable and lossless through the store (:mod:`bnlab.experiments.store`: a completed run
is never redone, a killed one is redone from scratch); parallel through the scheduler
(:mod:`bnlab.experiments.scheduler`: forked children that die with the parent). Each run
gets its data explicitly, in a :class:`~bnlab.experiments.base.RunContext`.

Plain training runs (kind ``"train"``) of one experiment whose configs differ only by the
seed are trained together in one child, stacked (:func:`bnlab.train.stacked.train_stacked`,
at most :data:`~bnlab.train.stacked.MAX_STACK` seeds), where the stacked engine can prove
that exact and it is faster (:func:`~bnlab.train.stacked.worth_stacking`); the child
writes each run's folder as a lone run would (``config.json`` first, ``summary.json``
last), so a group killed midway loses only its unfinished runs and a rerun does each of
them once. The others run one per child.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bnlab import __version__
from bnlab._lock import folder_lock
from bnlab._progress import Progress
from bnlab.errors import BnlabError
from bnlab.experiments import experiment_names, get_experiment, scheduler, store
from bnlab.experiments.base import PROFILES, Experiment, RunContext, RunOutput, train_run
from bnlab.experiments.store import CorruptRun, PlannedExperiment, PlannedRun


@dataclass
class ExperimentOutcome:
    name: str
    verdict: str | None
    elapsed_s: float
    runs_done: int
    runs_total: int
    failed: list[str]


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
        kinds = exp.runners()
        runs = []
        seen: set[str] = set()
        for spec in exp.runs(cfg, dataset):
            if spec.kind not in kinds:
                raise ValueError(f"experiment {name}: a run of kind {spec.kind!r}, which it has "
                                 f"no run function for (it has: {', '.join(kinds)})")
            run_id = spec.run_id(name)
            if run_id in seen:
                raise ValueError(f"experiment {name}: two runs with the same config ({spec})")
            seen.add(run_id)
            runs.append(PlannedRun(spec, run_id, out / name / "runs" / run_id))
        planned.append(PlannedExperiment(exp, cfg, out / name, runs))
    return planned


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
    stack: bool = True,
) -> list[ExperimentOutcome]:
    """Run the experiments ``names`` (resuming what is done) and write their results.

    ``stack=False`` runs every run in a child of its own (no stacked seeds)."""
    check_profile(profile)
    if jobs < 1:
        raise BnlabError(f"--jobs must be a positive whole number, got {jobs}")
    from bnlab.data import DATASETS, load_dataset

    if dataset not in DATASETS:
        raise BnlabError(f"unknown dataset {dataset!r}; expected one of: {', '.join(DATASETS)}")
    out = Path(out)
    planned = plan(names, profile, dataset, out)
    with folder_lock(out, "bnlab experiment"):  # one lab per folder; PID named
        store.prepare_out(out, planned, profile, dataset, force, known=experiment_names())
        done = {run.run_id: _is_done(run) for p in planned for run in p.runs}
        pending = [r for p in planned for r in p.runs if not done[r.run_id]]
        threads = scheduler.threads_per_run(jobs)
        ctx = None
        tasks = {p.experiment.name: group_runs(p, [r for r in p.runs if not done[r.run_id]],
                                               stack=stack) for p in planned}
        if pending:
            # loaded once, here: fails early with the data module's own message, and the
            # forked runs share it
            data = load_dataset(dataset, data_dir)
            warm = [t for p in planned if p.experiment.warm_up
                    for t in tasks[p.experiment.name]]
            scheduler.warm_up((r.spec.config for t in warm for r in t), data,
                              stacked=(t[0].spec.config for t in warm if len(t) > 1))
            ctx = RunContext(data=data, threads=threads, progress=progress if jobs == 1 else False)

        start = time.monotonic()
        with Progress(len(done), "lab", enabled=progress, unit="run", position=0) as bar:
            bar.update(len(done) - len(pending))
            outcomes = [
                _run_experiment(p, tasks[p.experiment.name], ctx, jobs=jobs, bar=bar,
                                profile=profile, dataset=dataset)
                for p in planned
            ]
        print_summary(outcomes, time.monotonic() - start, jobs, threads)
        failed_runs = [f for o in outcomes for f in o.failed]
        if failed_runs:
            raise BnlabError(
                f"{len(failed_runs)} run(s) failed; see error.txt in: " + ", ".join(failed_runs[:5])
            )
        return outcomes


def group_runs(p: PlannedExperiment, todo: list[PlannedRun], *, stack: bool = True
               ) -> list[list[PlannedRun]]:
    """``todo`` as the lab's tasks, in order: each a run alone, or (``stack``) up to
    :data:`~bnlab.train.stacked.MAX_STACK` plain training runs whose specs differ only by
    the seed, trained together where :func:`~bnlab.train.stacked.worth_stacking` says
    it is exact and faster. Only runs the experiment performs with the plain loop (its
    ``"train"`` run function is :func:`~bnlab.experiments.base.train_run`) are grouped."""
    exp = p.experiment
    if not stack or exp.runners().get("train") is not train_run \
            or type(exp).execute is not Experiment.execute:
        return [[r] for r in todo]
    from bnlab.train.stacked import MAX_STACK, worth_stacking

    cells: dict[str, list[PlannedRun]] = {}
    tasks: list[list[PlannedRun]] = []
    for run in todo:
        spec = run.spec
        if spec.kind != "train":
            tasks.append([run])
            continue
        key = json.dumps(replace(spec, seed=0, config=replace(spec.config, seed=0))
                         .identity(p.experiment.name), sort_keys=True, default=str)
        cell = cells.get(key)
        if cell is None or len(cell) == MAX_STACK:
            cell = cells[key] = []
            tasks.append(cell)
        cell.append(run)
    out: list[list[PlannedRun]] = []
    for task in tasks:
        if len(task) == 1 or worth_stacking([r.spec.config for r in task]):
            out.append(task)
        else:
            out += [[r] for r in task]
    return out


def _run_experiment(p: PlannedExperiment, tasks: list[list[PlannedRun]],
                    ctx: RunContext | None, *, jobs: int, bar: Progress, profile: str,
                    dataset: str) -> ExperimentOutcome:
    """The ``tasks`` of ``p`` (forked), then its results if no run failed."""
    t0 = time.monotonic()
    bar.set_postfix(experiment=p.experiment.name)
    failed: list[PlannedRun] = []
    if tasks and ctx is not None:
        failed_tasks = scheduler.run_forked(
            tasks, functools.partial(_perform, p, ctx=ctx), jobs=jobs,
            threads=ctx.threads, bar=bar, title=p.experiment.name, size=len,
            describe=_describe,
        )
        failed = [r for t in failed_tasks for r in t]
    verdict = None
    if not failed:
        verdict = write_results(p, profile, dataset, time.monotonic() - t0,
                                ran=sum(map(len, tasks)))
    return ExperimentOutcome(p.experiment.name, verdict, time.monotonic() - t0,
                             len(p.runs) - len(failed), len(p.runs),
                             [str(r.run_dir) for r in failed])


def _is_done(run: PlannedRun) -> bool:
    try:
        return store.load_run(run) is not None
    except CorruptRun as exc:
        print(f"corrupted result file {exc.path} ({exc.reason}); re-running run "
              f"{run.run_id}", file=sys.stderr)
        return False


def _describe(task: list[PlannedRun]) -> str:
    seeds = ",".join(str(r.spec.seed) for r in task)
    return f"{task[0].spec.label()}, seed{'s' if len(task) > 1 else ''}={seeds}"


def _perform(p: PlannedExperiment, task: list[PlannedRun], ctx: RunContext) -> None:
    """One task, in its forked child: a fresh folder per run, the run(s) (one alone, or a
    group stacked), each run's files (error.txt in each unfinished run's folder and exit
    status 1 if it raises)."""
    finished = 0
    try:
        for run in task:
            store.begin_run(run, p.experiment.name)
        specs = [replace(r.spec, config=replace(r.spec.config, threads=ctx.threads))
                 for r in task]
        if len(task) == 1:
            outputs = [p.experiment.execute(specs[0], ctx)]
        else:
            from bnlab.train.stacked import train_stacked

            outputs = [RunOutput(t.metrics, t.summary)
                       for t in train_stacked([s.config for s in specs], ctx.data)]
        for run, output in zip(task, outputs, strict=True):
            store.write_run_files(run.run_dir, output)
            finished += 1
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        for run in task[finished:]:
            store.write_error(run, text)
        ids = ", ".join(r.run_id for r in task[finished:])
        if isinstance(exc, BnlabError):
            print(f"run {ids}: error: {exc}", file=sys.stderr)
        else:
            print(f"run {ids} failed:\n{text}", file=sys.stderr)
        sys.exit(1)


def write_results(p: PlannedExperiment, profile: str, dataset: str, elapsed_s: float,
                  ran: int = 0) -> str:
    """Analyse a complete experiment and write result.json, NAME.csv and the plots.

    ``elapsed_s`` is this invocation's wall time; when it ran no run (all were done), the
    wall time of the invocation that did is kept from the previous result.json."""
    exp = p.experiment
    previous = store.previous_elapsed(p) if ran == 0 else None
    if previous is not None:
        elapsed_s = previous
    results = store.load_runs(p)
    analysis = exp.analyse(p.cfg, results)
    import matplotlib

    matplotlib.use("Agg")
    plots = exp.plot(p.cfg, results, p.dir)
    result = {
        "name": exp.name,
        "claim": exp.claim,
        "seeds": exp.seeds,
        "quote": exp.quote,
        "section": exp.section,
        "papers": exp.papers,
        "literature": exp.literature,
        "practice": dict(exp.practice),
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
        "run_time_s": sum(float(r.summary.get("wall_time_s", 0.0) or 0.0) for r in results),
        "elapsed_s": elapsed_s,
        "csv": f"{exp.name}.csv",
        "plots": plots,
    }
    store.write_result(p, result, analysis.table)
    return analysis.verdict


def print_summary(outcomes: list[ExperimentOutcome], total_s: float, jobs: int,
                  threads: int) -> None:
    print(f"\n{'experiment':<18} {'runs':>9} {'time':>9}  verdict")
    for o in outcomes:
        verdict = o.verdict or f"FAILED ({len(o.failed)} run(s))"
        print(f"{o.name:<18} {o.runs_done:>4}/{o.runs_total:<4} {o.elapsed_s:>8.1f}s  {verdict}")
    print(f"{'total':<18} {'':>9} {total_s:>8.1f}s  (--jobs {jobs}, {threads} thread(s) per run)")
