"""batch-size: the verdict rule on synthetic results (growth of BN's deficit against the
best of GroupNorm/LayerNorm from the largest to the smallest batch, paired by seed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Results = Callable[..., list[RunResult]]


@pytest.mark.parametrize(
    ("bn_small", "jitter", "expected"),
    [(0.60, 0.001, "supported"),
     (0.97, 0.001, "not supported"),  # BN as good as GN/LN at batch 2
     (0.95, 0.02, "inconclusive")],  # 2 ± 2 points per seed
)
def test_batch_size_rule_on_the_smallest_and_largest_batch(
    synthetic_results: Results, bn_small: float, jitter: float, expected: str,
) -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        acc = 0.97
        if spec.group["norm"] == "bn" and spec.group["batch"] == 2:
            acc = bn_small + jitter * (-1) ** spec.seed
        if spec.group["norm"] in ("renorm", "ghost"):
            acc = 0.1  # shown for scale, never decide
        return {"test_acc": acc}, [{"step": 1, "test_acc": acc}]

    exp = get_experiment("batch-size")
    a = exp.analyse(exp.config("full"), synthetic_results("batch-size", outcome))
    assert a.verdict == expected
    assert a.effect["gap_growth_pp"] == pytest.approx(100 * (0.97 - bn_small) - 100 * jitter / 5)


def test_batch_size_quick_is_fulls_protocol_at_equal_samples() -> None:
    exp = get_experiment("batch-size")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3] and len(full.seeds) >= 5
    assert (quick.samples, quick.batches, quick.model) == (full.samples, full.batches, full.model)
    runs = exp.runs(full, "mnist")
    assert {r.config.steps * r.config.batch_size for r in runs} == {full.samples}
