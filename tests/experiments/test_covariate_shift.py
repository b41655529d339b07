"""covariate-shift: one protocol for quick and full, the verdict rule on synthetic results,
and the training-mode probe that leaves the model's statistics alone."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult
from bnlab.experiments.covariate_shift import train_with_percentiles
from bnlab.train import TrainConfig


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_quick_and_full_run_one_protocol() -> None:
    """The drift depends on the length of training and on how often it is recorded, so
    quick may differ from full only by its seeds (a subset of full's)."""
    exp = get_experiment("covariate-shift")
    quick, full = asdict(exp.config("quick")), asdict(exp.config("full"))
    assert set(quick.pop("seeds")) <= set(full.pop("seeds"))
    assert quick == full
    for profile in ("quick", "full"):
        cfg = exp.config(profile)
        runs = exp.runs(cfg, "mnist")
        numpy = {r.seed for r in runs if r.group["backend"] == "numpy"}
        assert numpy == set(cfg.seeds[:cfg.numpy_seeds]) == {0}
        assert {r.seed for r in runs if r.group["backend"] == "torch"} == set(cfg.seeds)


def _results(move_none: Any, profile: str = "full") -> list[RunResult]:
    """Every planned run: BN's percentiles move by 0.1 between recordings, no BN's by
    ``move_none(seed)``; the width is 2 for both."""
    exp = get_experiment("covariate-shift")
    out = []
    for spec in exp.runs(exp.config(profile), "mnist"):
        move = 0.1 if spec.group["norm"] == "bn" else move_none(spec.seed)
        metrics = [{"step": 100 * i, "test_acc": 0.9, "p15": -1 + move * (i % 2),
                    "p50": move * (i % 2), "p85": 1 + move * (i % 2)} for i in range(6)]
        out.append(RunResult(spec, spec.run_id(exp.name), {"test_acc": 0.9}, metrics))
    return out


@pytest.mark.parametrize(("move_none", "expected"), [
    (lambda s: 0.3 + 0.01 * s, "supported"),  # ~3× more drift without BN
    (lambda s: 0.1 + 0.002 * s, "not supported"),  # the same drift
    (lambda s: 0.4 if s % 2 else 0.06, "inconclusive"),  # seeds disagree
])
def test_verdict_rule(move_none: Any, expected: str) -> None:
    exp = get_experiment("covariate-shift")
    a = exp.analyse(exp.config("full"), _results(move_none))
    assert a.verdict == expected
    ratios = [math.log2(move_none(s) / 0.1) for s in exp.config("full").seeds]
    assert a.effect["log2_drift_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    assert a.effect["seeds"] == 5 and "95 % CI" in a.headline


def test_training_mode_probe_restores_the_running_statistics() -> None:
    """Percentiles taken in training mode normalise the probe images as a batch (BN: not
    the running statistics), and the run is the same as one probed in eval mode: the
    probe forward changes nothing the training sees."""
    from bnlab.data.datasets import load_digits_splits

    data = load_digits_splits()
    cfg = TrainConfig(dataset="digits", model="paper_mlp", norm="bn", steps=20, lr=0.5,
                      momentum=0.0, batch_size=60, eval_every=10, seed=0)
    states: dict[str, list[dict[str, torch.Tensor]]] = {"train": [], "eval": []}

    def keeper(mode: str) -> Any:
        def keep(model: Any, step: int) -> dict[str, Any]:  # called after the percentiles
            states[mode].append({k: v.clone() for k, v in model.state_dict().items()})
            return {"probed": step}
        return keep

    train = train_with_percentiles(cfg, "torch", data, probe_mode="train",
                                   probe=keeper("train"))
    evals = train_with_percentiles(cfg, "torch", data, probe=keeper("eval"))
    assert [m["probed"] for m in train.metrics] == [0, 10, 20]
    assert [m["test_acc"] for m in train.metrics] == [m["test_acc"] for m in evals.metrics]
    assert [m["p50"] for m in train.metrics] != [m["p50"] for m in evals.metrics]
    for a, b in zip(states["train"], states["eval"], strict=True):  # running stats included
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="eval mode only"):
        train_with_percentiles(cfg, "numpy", data, probe_mode="train")
    with pytest.raises(ValueError, match="probe_mode must be"):
        train_with_percentiles(cfg, "torch", data, probe_mode="batch")
