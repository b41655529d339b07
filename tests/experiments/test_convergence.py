"""The convergence rule on synthetic results: the area under the accuracy curve, BN minus
no BN per seed, decided by compare(); steps to the dataset's own target beside it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]
Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]

STEPS = 5  # evaluations of a synthetic curve: final · (i + 1) / 5 at steps 100 … 500


def curve(final: float) -> list[dict[str, Any]]:
    return [{"step": 100 * (i + 1), "test_acc": final * (i + 1) / STEPS} for i in range(STEPS)]


def by_seed(diffs_pp: list[float]) -> Outcome:
    """No BN ends at 90 %; BN's curve lies ``diffs_pp[seed]`` points higher on average
    (a linear curve's mean is 3/5 of its final value)."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        final = 0.9
        if spec.group["norm"] == "bn":
            final += diffs_pp[spec.seed] / 100 / (3 / STEPS)
        return {"test_acc": final}, curve(final)
    return outcome


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([1.5, 1.8, 1.6, 1.4, 1.7], "supported"),
        ([0.1, -0.2, 0.0, 0.2, -0.1], "not supported"),
        ([-2.0, -1.5, -2.5, -1.8, -2.2], "not supported"),  # BN slower
        ([6.0, -4.0, 5.0, -3.0, 4.0], "inconclusive"),  # the interval straddles 1 point
    ],
)
def test_convergence_verdicts(synthetic_results: Results, diffs: list[float],
                              expected: str) -> None:
    exp = get_experiment("convergence")
    a = exp.analyse(exp.config("full"), synthetic_results("convergence", by_seed(diffs)))
    assert a.verdict == expected
    assert a.effect["curve_diff_pp"] == pytest.approx(sum(diffs) / len(diffs))
    assert a.effect["seeds"] == 5 and "95 % CI" in a.headline


def test_quick_decides_like_full_on_the_same_seeds(synthetic_results: Results) -> None:
    """quick is full's protocol on its first three seeds: a clear effect is decided the
    same way, a noisy one stays undecided."""
    exp = get_experiment("convergence")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3] and quick.steps == full.steps
    clear = by_seed([1.5, 1.8, 1.6, 1.4, 1.7])
    clear_results = synthetic_results("convergence", clear, "quick")
    assert exp.analyse(quick, clear_results).verdict == "supported"
    noisy = by_seed([6.0, -4.0, 5.0])
    assert exp.analyse(quick, synthetic_results("convergence", noisy, "quick")).verdict == (
        "inconclusive")


@pytest.mark.parametrize(("dataset", "target", "bn_step"), [("mnist", 0.97, 500),
                                                           ("fashion-mnist", 0.85, 500)])
def test_steps_to_the_datasets_own_target(synthetic_results: Results, dataset: str,
                                          target: float, bn_step: int) -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        final = target + 0.005 if spec.group["norm"] == "bn" else target - 0.05
        return {"test_acc": final}, curve(final)

    exp = get_experiment("convergence")
    a = exp.analyse(exp.config("full"), synthetic_results("convergence", outcome, dataset=dataset))
    assert a.effect["target"] == target
    assert a.effect["steps_to_target_bn"] == bn_step
    assert math.isinf(a.effect["steps_to_target_none"])
    assert f"steps to {100 * target:g} %: BN {bn_step}, no BN never" in a.headline
