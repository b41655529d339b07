"""bjorck-2018: the verdict rule on synthetic results (BN's gain at the large learning
rate minus its gain at the small one, per seed)."""

from __future__ import annotations

from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult
from bnlab.experiments.bjorck_2018 import PAIRED


def results(acc: Any) -> list[RunResult]:
    exp = get_experiment("bjorck-2018")
    cfg = exp.config("full")
    return [RunResult(spec, spec.run_id("bjorck-2018"), acc(cfg, spec), [])
            for spec in exp.runs(cfg, "mnist")]


def gain_only_at_large_lr(cfg: Any, spec: Any) -> dict[str, Any]:
    if spec.group["norm"] == "none" and spec.group["lr"] == cfg.large_lr:
        return {"test_acc": float("nan"), "diverged": True}  # counts as chance, 10 %
    return {"test_acc": 0.95 + 0.001 * spec.seed * (spec.group["norm"] == "bn")}


def same_gain(cfg: Any, spec: Any) -> dict[str, Any]:
    return {"test_acc": 0.95 + (0.01 + 0.001 * spec.seed) * (spec.group["norm"] == "bn")}


def noisy(cfg: Any, spec: Any) -> dict[str, Any]:
    swing = 0.3 if spec.seed % 2 else -0.2
    large_none = spec.group["norm"] == "none" and spec.group["lr"] == cfg.large_lr
    return {"test_acc": 0.6 - swing if large_none else 0.6}


@pytest.mark.parametrize(
    ("acc", "expected"),
    [(gain_only_at_large_lr, "supported"), (same_gain, "not supported"),
     (noisy, "inconclusive")],
)
def test_rule(acc: Any, expected: str) -> None:
    exp = get_experiment("bjorck-2018")
    a = exp.analyse(exp.config("full"), results(acc))
    assert a.verdict == expected
    assert a.effect["threshold_pp"] == PAIRED.threshold
    if expected == "supported":
        assert a.effect["gain_large_lr_pp"] == pytest.approx(85.2)
        assert a.effect["gain_small_lr_pp"] == pytest.approx(0.2)
        assert a.effect["gain_diff_pp"] == pytest.approx(85.0)
    assert "95 % CI" in a.headline


def test_runs_pair_both_norms_at_both_rates_per_seed() -> None:
    exp = get_experiment("bjorck-2018")
    cfg = exp.config("quick")
    runs = exp.runs(cfg, "mnist")
    cells = {(r.group["norm"], r.group["lr"], r.seed) for r in runs}
    assert len(cells) == len(runs) == 4 * len(cfg.seeds)
    assert all(r.config.lr == r.group["lr"] for r in runs)
    assert cfg.small_lr < cfg.large_lr
