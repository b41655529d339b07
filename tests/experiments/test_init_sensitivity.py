"""The init-sensitivity rule on synthetic results: per seed, the range of final accuracy
over the init scales, no BN's minus BN's, decided by compare()."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]
Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]


def ranges(bn_pp: list[float], none_pp: list[float]) -> Outcome:
    """At init scale 1 every run ends at 98 %; at the other scales a variant's runs end
    ``range[seed]`` points lower (so that is the seed's range)."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        drop = (bn_pp if spec.group["norm"] == "bn" else none_pp)[spec.seed]
        acc = 0.98 if spec.group["init_scale"] == 1.0 else 0.98 - drop / 100
        return {"test_acc": acc}, [{"step": 500, "test_acc": acc}]
    return outcome


@pytest.mark.parametrize(
    ("bn", "none", "expected"),
    [
        ([1.0, 2.0, 1.5, 1.0, 2.5], [40.0, 60.0, 50.0, 45.0, 55.0], "supported"),
        ([3.0, 2.0, 4.0, 3.0, 2.5], [3.5, 2.0, 3.0, 4.0, 2.5], "not supported"),
        ([30.0, 2.0, 40.0, 1.0, 35.0], [2.0, 30.0, 1.0, 40.0, 20.0], "inconclusive"),
    ],
)
def test_init_sensitivity_verdicts(synthetic_results: Results, bn: list[float], none: list[float],
                                   expected: str) -> None:
    exp = get_experiment("init-sensitivity")
    a = exp.analyse(exp.config("full"), synthetic_results("init-sensitivity", ranges(bn, none)))
    assert a.verdict == expected
    assert a.effect["diff_pp"] == pytest.approx((sum(none) - sum(bn)) / 5)
    assert a.effect["range_bn_pp"] == pytest.approx(sum(bn) / 5)


def test_quick_is_full_on_three_seeds() -> None:
    exp = get_experiment("init-sensitivity")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3]
    assert (quick.steps, quick.scales, quick.model) == (full.steps, full.scales, full.model)
