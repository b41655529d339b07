"""Runs per minute of the lab's runner: one child per run (``stack=False``) against the
runner's default (seeds of one cell trained stacked), same workload, same process.

Run: ``BNLAB_DATA_DIR=... python benchmarks/bench_lab.py [--rounds 2] [--jobs 2]
[--workloads paper_mlp deep_mlp seed_cnn]``

Each workload is a throwaway experiment of plain training runs on MNIST, run by
:func:`bnlab.experiments.runner.run_lab` into a fresh folder, with ``--jobs`` children of
one thread each (the cores the runner sees are pinned to ``jobs``, so each child gets one
thread whatever the machine):

* ``paper_mlp``: 10 runs, 5 seeds x {bn, none}, 300 steps, evaluated every 100 steps on
  2000 test images;
* ``deep_mlp``: 6 runs, 3 seeds x {bn, none}, depth 4, width 100, 300 steps, same evaluation;
* ``seed_cnn``: 4 runs, 2 seeds x {bn, none}, 60 steps, evaluated every 30 steps on 1000
  test images.

The time is the whole ``run_lab`` call (data loading, warm-up, forks, training, file
writes, results), so runs/min is what a user of ``bnlab experiment`` sees. The old and
new runners alternate (old, new, old, new, ...) so that a change in the machine's load
hits both; the best round of each is printed, with the ratio new / old.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from bnlab.experiments import runner, scheduler
from bnlab.experiments.base import Analysis, Experiment, RunResult, RunSpec
from bnlab.train import TrainConfig


@dataclass(frozen=True)
class Workload:
    model: str
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    eval_subset: int
    model_kwargs: tuple[tuple[str, Any], ...] = ()


WORKLOADS = {
    "paper_mlp": Workload("paper_mlp", (0, 1, 2, 3, 4), 300, 100, 2000),
    "deep_mlp": Workload("deep_mlp", (0, 1, 2), 300, 100, 2000,
                         (("depth", 4), ("width", 100))),
    "seed_cnn": Workload("seed_cnn", (0, 1), 60, 30, 1000),
}


class Bench(Experiment):
    """Plain training runs of one workload, seeds x {bn, none}."""

    name = "bench"
    claim = "none"
    rule = "none"
    profiles: ClassVar[dict[str, Workload]] = {}

    def protocol(self, cfg: Workload) -> str:
        return cfg.model

    def runs(self, cfg: Workload, dataset: str) -> list[RunSpec]:
        return [RunSpec({"norm": norm}, seed, TrainConfig(
            dataset=dataset, model=cfg.model, norm=norm, model_kwargs=dict(cfg.model_kwargs),
            seed=seed, steps=cfg.steps, eval_every=cfg.eval_every, eval_subset=cfg.eval_subset,
            lr=0.05)) for norm in ("bn", "none") for seed in cfg.seeds]

    def analyse(self, cfg: Workload, results: list[RunResult]) -> Analysis:
        return Analysis("inconclusive", "n/a", {}, [{"runs": len(results)}])


def runs_per_minute(exp: Bench, workload: Workload, jobs: int, stack: bool) -> float:
    exp.profiles["smoke"] = workload
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outcomes = runner.run_lab([exp.name], profile="smoke", out=Path(tmp) / "lab",
                                  jobs=jobs, progress=False, stack=stack)
        elapsed = time.perf_counter() - t0
    return 60.0 * outcomes[0].runs_total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = Bench()
    runner.experiment_names = lambda: [exp.name]  # type: ignore[assignment]
    runner.get_experiment = lambda name: exp  # type: ignore[assignment]
    scheduler.available_cores = lambda: args.jobs  # one thread per child
    rows = []
    for name in args.workloads:
        w = WORKLOADS[name]
        best = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for stack in (False, True):
                best[stack] = max(best[stack], runs_per_minute(exp, w, args.jobs, stack))
        rows.append((name, 2 * len(w.seeds), best[False], best[True]))
    print(f"\n--jobs {args.jobs}, 1 thread per child, best of {args.rounds} rounds")
    print(f"{'workload':<10} {'runs':>4} {'old runs/min':>13} {'new runs/min':>13} {'new/old':>8}")
    for name, n, old, new in rows:
        print(f"{name:<10} {n:>4} {old:>13.1f} {new:>13.1f} {new / old:>7.2f}x")


if __name__ == "__main__":
    main()
