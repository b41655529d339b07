"""Reading completed runs for an analysis: accuracies, curves, pairing by seed, table rows.

A diverged run (or a non-finite accuracy) counts as chance, ``1 / classes`` of the run's
dataset (:attr:`bnlab.experiments.base.RunResult.chance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bnlab.experiments.base import RunResult
from bnlab.experiments.verdict import mean_std


def final_acc(result: RunResult) -> float:
    """Final test accuracy in [0, 1]; a diverged run counts as chance."""
    acc = result.summary.get("test_acc")
    if result.summary.get("diverged") or acc is None or not math.isfinite(float(acc)):
        return result.chance
    return float(acc)


def acc_curve(result: RunResult) -> tuple[list[int], list[float]]:
    """(steps, test accuracies) of a run's evaluations; non-finite values become chance."""
    steps, accs = [], []
    for m in result.metrics:
        if "test_acc" not in m:
            continue
        a = m["test_acc"]
        steps.append(int(m["step"]))
        accs.append(float(a) if a is not None and math.isfinite(float(a)) else result.chance)
    return steps, accs


def steps_to(result: RunResult, threshold: float) -> float:
    """First evaluated step with test accuracy >= threshold; ``inf`` if never reached."""
    for step, acc in zip(*acc_curve(result), strict=True):
        if acc >= threshold:
            return float(step)
    return math.inf


def paired_diffs_pp(claimed: Sequence[RunResult], other: Sequence[RunResult],
                    metric: Callable[[RunResult], float] = final_acc) -> list[float]:
    """Per seed, ``metric`` of the ``claimed`` run minus the ``other`` run, in percentage
    points; both lists sorted by seed, as :func:`select` returns them."""
    return [100 * (metric(a) - metric(b)) for a, b in zip(claimed, other, strict=True)]


def select(results: Iterable[RunResult], **group: Any) -> list[RunResult]:
    """The results whose group contains every ``key=value`` given, sorted by seed."""
    chosen = [r for r in results if all(r.spec.group.get(k) == v for k, v in group.items())]
    return sorted(chosen, key=lambda r: r.spec.seed)


def eval_set_text(eval_subset: int | None) -> str:
    """How the protocol names the evaluation set."""
    return "the full test set" if eval_subset is None else f"the first {eval_subset} test images"


def model_text(model: str, model_kwargs: dict[str, Any]) -> str:
    """How the protocol names a model: its name and every option (defaults filled in),
    e.g. ``deep_mlp (depth 4, width 100, dropout 0.0)``."""
    from bnlab.models import model_kwargs_of

    options = {**model_kwargs_of(model), **model_kwargs}
    return f"{model} ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else model


def fmt_ms(values: Sequence[float], scale: float = 100.0, unit: str = " %") -> str:
    """``mean ± std`` of ``values`` times ``scale`` (accuracies in % by default)."""
    m, s, n = mean_std(values)
    if n == 0 or not math.isfinite(m):
        return "n/a"
    if n == 1:
        return f"{scale * m:.2f}{unit}"
    return f"{scale * m:.2f} ± {scale * s:.2f}{unit}"


def table_row(group: dict[str, Any], **cols: Any) -> dict[str, Any]:
    return {**{k: ("None" if v is None else v) for k, v in group.items()}, **cols}


def acc_row(group: dict[str, Any], runs: Sequence[RunResult], **cols: Any) -> dict[str, Any]:
    """The table row of ``group``: final accuracy (mean ± std), ``cols``, the number of
    diverged runs and of seeds."""
    return table_row(group, final_acc=fmt_ms([final_acc(r) for r in runs]), **cols,
                     diverged=sum(bool(r.summary.get("diverged")) for r in runs),
                     seeds=len(runs))


def dataset_target(targets: dict[str, float], results: Sequence[RunResult]) -> float:
    """The accuracy target declared for the dataset the ``results`` ran on (every run of
    an experiment runs on one dataset). ValueError when the config declares none for it."""
    datasets = {r.spec.config.dataset for r in results}
    if len(datasets) != 1:
        raise ValueError(f"expected the runs of one dataset, got {sorted(datasets)}")
    dataset = datasets.pop()
    if dataset not in targets:
        raise ValueError(f"no accuracy target declared for dataset {dataset!r}; the config "
                         f"declares targets for: {', '.join(targets)}")
    return targets[dataset]
