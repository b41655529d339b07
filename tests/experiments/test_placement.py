"""The placement rule on synthetic results: final accuracy with BN before the ReLU minus
after it, per seed, decided by compare()."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([0.6, 0.5, 0.7, 0.6, 0.5], "supported"),
        ([-0.1, 0.05, 0.0, -0.05, 0.1], "not supported"),
        ([-0.5, -0.4, -0.6, -0.3, -0.5], "not supported"),  # after is better
        ([1.5, -1.0, 1.2, -0.8, 0.9], "inconclusive"),
    ],
)
def test_placement_verdicts(synthetic_results: Results, diffs: list[float], expected: str) -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        acc = 0.97 + (diffs[spec.seed] / 100 if spec.group["placement"] == "before" else 0.0)
        return {"test_acc": acc}, [{"step": 1000, "test_acc": acc}]

    exp = get_experiment("placement")
    a = exp.analyse(exp.config("full"), synthetic_results("placement", outcome))
    assert a.verdict == expected
    assert a.effect["diff_pp"] == pytest.approx(sum(diffs) / 5)


def test_both_placements_train_the_same_mlp_with_bn() -> None:
    exp = get_experiment("placement")
    runs = exp.runs(exp.config("full"), "fashion-mnist")
    assert {(r.config.model, r.config.norm, r.config.dataset) for r in runs} == {
        ("deep_mlp", "bn", "fashion-mnist")}
    assert sorted(r.config.placement for r in runs) == ["after"] * 5 + ["before"] * 5
    quick = exp.config("quick")
    assert quick.seeds == exp.config("full").seeds[:3] and quick.steps == exp.config("full").steps
