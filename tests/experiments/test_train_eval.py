"""train-eval: the verdict rule on synthetic results (running minus batch statistics at the
smallest eval batch, momentum 0.1, paired by seed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]


@pytest.mark.parametrize(
    ("small", "jitter", "expected"),
    [(0.40, 0.001, "supported"),
     (0.98, 0.001, "not supported"),  # batch statistics of 2 images cost nothing
     (0.97, 0.02, "inconclusive")],  # 1 ± 2 points per seed
)
def test_train_eval_rule_uses_momentum_01_and_the_smallest_batch(
    synthetic_results: Results, small: float, jitter: float, expected: str,
) -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if spec.group["bn_momentum"] != 0.1:  # other momenta are shown, never decide
            variants = dict.fromkeys(("running", "batch_1000", "batch_32", "batch_8",
                                      "batch_2"), 0.1)
        else:
            variants = {"running": 0.98, "batch_1000": 0.98, "batch_32": 0.97,
                        "batch_8": 0.9, "batch_2": small + jitter * (-1) ** spec.seed}
        return {"test_acc": 0.98, "eval_variants": variants}, [{"step": 1, "test_acc": 0.98}]

    exp = get_experiment("train-eval")
    a = exp.analyse(exp.config("full"), synthetic_results("train-eval", outcome))
    assert a.verdict == expected
    assert a.effect["diff_pp"] == pytest.approx(100 * (0.98 - small) - 100 * jitter / 5)
    assert a.effect["smallest_eval_batch"] == 2


def test_train_eval_quick_is_fulls_protocol_on_three_seeds() -> None:
    exp = get_experiment("train-eval")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3] and len(full.seeds) >= 5
    assert (quick.steps, quick.eval_subset, quick.momenta, quick.eval_batches) == (
        full.steps, full.eval_subset, full.momenta, full.eval_batches)
    assert 0.1 in full.momenta
