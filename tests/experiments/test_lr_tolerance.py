"""The lr-tolerance rule on synthetic results: per seed, the reach (grid position of the
largest learning rate reaching the dataset's target without diverging), BN minus no BN,
decided by compare() in grid steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.experiments.lr_tolerance import reach

Results = Callable[..., list[RunResult]]
Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]
LRS = get_experiment("lr-tolerance").config("full").lrs


def reaching(bn: list[int], none: list[int], acc: float = 0.99) -> Outcome:
    """Per seed, every rate up to grid position ``bn[seed]`` (``none[seed]``) ends at
    ``acc``; the rates above diverge."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        top = (bn if spec.group["norm"] == "bn" else none)[spec.seed]
        if LRS.index(spec.group["lr"]) < top:
            return {"test_acc": acc}, [{"step": 500, "test_acc": acc}]
        return {"test_acc": float("nan"), "diverged": True}, []
    return outcome


@pytest.mark.parametrize(
    ("bn", "none", "expected"),
    [
        ([5, 5, 5, 5, 5], [3, 3, 3, 3, 3], "supported"),  # two grid steps higher every seed
        ([4, 5, 4, 4, 5], [3, 3, 3, 3, 3], "supported"),
        ([3, 3, 3, 3, 3], [3, 3, 3, 3, 3], "not supported"),  # the same reach
        ([2, 2, 2, 2, 2], [4, 4, 4, 4, 4], "not supported"),  # no BN tolerates more
        ([6, 2, 5, 2, 4], [3, 3, 3, 3, 3], "inconclusive"),  # seeds disagree
        ([3, 3, 3, 3, 3], [0, 0, 0, 0, 0], "supported"),  # no BN reaches the target nowhere
    ],
)
def test_lr_tolerance_verdicts(synthetic_results: Results, bn: list[int], none: list[int],
                               expected: str) -> None:
    exp = get_experiment("lr-tolerance")
    a = exp.analyse(exp.config("full"), synthetic_results("lr-tolerance", reaching(bn, none)))
    assert a.verdict == expected
    assert a.effect["reach_diff_steps"] == pytest.approx((sum(bn) - sum(none)) / 5)
    assert a.effect["max_good_lr_bn"] == (LRS[min(bn) - 1] if min(bn) else None)
    assert a.effect["max_good_lr_none"] == (LRS[min(none) - 1] if min(none) else None)


def test_a_grid_that_does_not_bracket_the_limit_decides_nothing(synthetic_results: Results) -> None:
    """Equal reaches at the floor (0) or at the ceiling (the largest rate) on every seed
    say nothing about which variant tolerates more; equal reaches inside the grid do."""
    exp = get_experiment("lr-tolerance")
    cfg = exp.config("full")
    top = len(LRS)
    for bn, none, expected in (([0] * 5, [0] * 5, "inconclusive"),
                               ([top] * 5, [top] * 5, "inconclusive"),
                               ([top, 0, top, 0, top], [top, 0, top, 0, top], "inconclusive"),
                               ([top, 3, top, 3, top], [top, 3, top, 3, top], "not supported")):
        a = exp.analyse(cfg, synthetic_results("lr-tolerance", reaching(bn, none)))
        assert a.verdict == expected, (bn, none)
    assert "does not bracket the limit" in exp.rule


def test_a_diverged_run_is_not_good_whatever_its_accuracy(synthetic_results: Results) -> None:
    """A run that diverged late may still report an accuracy: it does not count."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {"test_acc": 0.99, "diverged": spec.group["lr"] > 0.1}, []

    exp = get_experiment("lr-tolerance")
    cfg = exp.config("full")
    results = [r for r in synthetic_results("lr-tolerance", outcome)
               if r.spec.seed == 0 and r.spec.group["norm"] == "bn"]
    assert reach(cfg, results, 0.95) == LRS.index(0.1) + 1
    assert reach(cfg, [], 0.95) == 0


@pytest.mark.parametrize(("dataset", "expected"), [("mnist", "inconclusive"),
                                                   ("fashion-mnist", "supported")])
def test_the_target_is_the_datasets_own(synthetic_results: Results, dataset: str,
                                        expected: str) -> None:
    """86 % is a good run on Fashion-MNIST (target 82 %) but not on MNIST (95 %), where no
    run of either variant reaches the target: the grid tested nothing."""
    exp = get_experiment("lr-tolerance")
    outcome = reaching([4] * 5, [2] * 5, acc=0.86)
    a = exp.analyse(exp.config("full"), synthetic_results("lr-tolerance", outcome, dataset=dataset))
    assert a.verdict == expected
    assert a.effect["target"] == exp.config("full").targets[dataset]


def test_quick_is_full_on_three_seeds() -> None:
    exp = get_experiment("lr-tolerance")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3]
    assert (quick.steps, quick.lrs, quick.model) == (full.steps, full.lrs, full.model)
