"""regularization: the verdict rule on synthetic results (train − test gap, paired by seed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]


@pytest.mark.parametrize(
    ("bn_test", "jitter", "expected"),
    [(0.95, 0.0005, "supported"),  # BN's gap 2 points smaller
     (0.93, 0.0005, "not supported"),  # the same gap
     (0.92, 0.0005, "not supported"),  # BN overfits more
     (0.935, 0.005, "inconclusive")],  # 0.6 ± 0.5 points per seed
)
def test_regularization_rule(synthetic_results: Results, bn_test: float, jitter: float,
                             expected: str) -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        test = 0.93 if spec.group["norm"] == "none" else bn_test + jitter * (-1) ** spec.seed
        if spec.group["dropout"]:
            test -= 0.05  # dropout runs are shown, never decide
        return {"test_acc": test}, [{"step": 1000, "test_acc": test, "train_acc": 1.0}]

    exp = get_experiment("regularization")
    a = exp.analyse(exp.config("full"), synthetic_results("regularization", outcome))
    assert a.verdict == expected
    assert a.effect["gap_diff_pp"] == pytest.approx(100 * (bn_test - 0.93) + 100 * jitter / 5)


def test_regularization_quick_is_fulls_protocol_on_three_seeds() -> None:
    exp = get_experiment("regularization")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3] and len(full.seeds) >= 5
    assert (quick.steps, quick.train_subset, quick.model) == (
        full.steps, full.train_subset, full.model)
    assert exp.rule.count("0.5 percentage points") == 2  # the claimed size stays
