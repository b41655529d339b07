"""Stacked seeds against separate runs: :func:`bnlab.train.train` is the oracle.

Tolerances are float32's: a batched matmul sums in another order than a lone one, so
losses and parameters agree to ~1e-6 relative (asserted at 1e-5) and an accuracy may
differ by at most one test image. Trajectories that amplify rounding (a high learning
rate on a near-dead unit) diverge from a run whose init is perturbed by one ulp just as
much; the configs here are well conditioned.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
import torch

from bnlab.data import load_dataset
from bnlab.train import TrainConfig, TrainResult, train
from bnlab.train.stacked import stack_refusal, train_stacked

pytestmark = pytest.mark.usefixtures("single_threaded")

MODELS = {"paper_mlp": {"width": 32}, "deep_mlp": {"depth": 3, "width": 32},
          "deep_mlp residual": {"depth": 3, "width": 32, "residual": True}}
TIMING = ("wall_time_s", "train_time_s", "step_time_ms", "stacked")


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def configs(seeds: tuple[int, ...], **kw: Any) -> list[TrainConfig]:
    base = {"dataset": "digits", "steps": 30, "eval_every": 10, "lr": 0.05,
            "eval_subset": 200, **kw}
    return [TrainConfig(seed=s, **base) for s in seeds]


def assert_same_run(stacked: TrainResult, alone: TrainResult) -> None:
    assert len(stacked.metrics) == len(alone.metrics)
    for rs, ra in zip(stacked.metrics, alone.metrics, strict=True):
        assert rs.keys() == ra.keys()
        for k in rs:
            if k == "wall_time_s":
                continue
            if k in ("train_loss", "test_loss") and ra[k] is not None:
                assert rs[k] == pytest.approx(ra[k], rel=1e-5), (k, rs, ra)
            elif k == "test_acc":
                assert abs(rs[k] - ra[k]) * ra["test_n"] <= 1, (rs, ra)
            else:
                assert rs[k] == ra[k], (k, rs, ra)
    ss, sa = stacked.summary, alone.summary
    assert ss["stacked"] >= 2 and "stacked" not in sa
    assert ss.keys() - {"stacked"} == sa.keys()
    for k in sa:
        if k in TIMING or k in ("test_loss", "train_loss", "test_acc", "best_test_acc"):
            continue
        assert ss[k] == sa[k], k
    state_s, state_a = stacked.model.state_dict(), alone.model.state_dict()
    assert state_s.keys() == state_a.keys()
    for k, va in state_a.items():
        vs = state_s[k]
        if va.is_floating_point():
            scale = float(va.abs().max()) or 1.0
            assert float((vs - va).abs().max()) <= 1e-5 * scale, k
        else:
            assert torch.equal(vs, va), k  # num_batches_tracked


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_stacked_seeds_equal_separate_runs(digits: Any, model: str, norm: str) -> None:
    cfgs = configs((0, 1, 2), model=model.split()[0], norm=norm, model_kwargs=MODELS[model])
    assert stack_refusal(cfgs) is None
    stacked = train_stacked(cfgs, digits)
    for result, cfg in zip(stacked, cfgs, strict=True):
        assert result.summary["stacked"] == 3
        assert result.summary["wall_time_s"] > 0
        assert_same_run(result, train(cfg, data=digits, progress=False))


def test_bn_running_statistics_are_updated_per_seed(digits: Any) -> None:
    """Each seed's BN buffers equal its own separate run's (not a shared or mixed copy),
    and the seeds' buffers differ from each other."""
    cfgs = configs((3, 4), model="paper_mlp", norm="bn", model_kwargs={"width": 8}, steps=7,
                   eval_every=7)
    a, b = train_stacked(cfgs, digits)
    mean = "hidden1.norm.running_mean"
    for result, cfg in ((a, cfgs[0]), (b, cfgs[1])):
        alone = train(cfg, data=digits, progress=False).model.state_dict()
        state = result.model.state_dict()
        for k in (mean, "hidden1.norm.running_var"):
            torch.testing.assert_close(state[k], alone[k], rtol=1e-5, atol=1e-7)
        assert int(state["hidden1.norm.num_batches_tracked"]) == 7
    assert not torch.allclose(a.model.state_dict()[mean], b.model.state_dict()[mean])


def test_a_diverging_seed_stops_and_the_others_go_on(digits: Any) -> None:
    """At lr 1000 seed 1 diverges at step 4 and seed 4 at step 25, seed 0 never: each
    stops (and is summarised) as its separate run does, the healthy seed trains on."""
    cfgs = configs((0, 1, 4), model="deep_mlp", norm="none",
                   model_kwargs={"depth": 2, "width": 16}, lr=1e3)
    stacked = train_stacked(cfgs, digits)
    alone = [train(c, data=digits, progress=False) for c in cfgs]
    assert [r.summary["diverged_at_step"] for r in alone] == [None, 4, 25]
    for s, a in zip(stacked, alone, strict=True):
        assert_same_run(s, a)
    assert stacked[0].summary["steps"] == 30 and stacked[1].summary["steps"] == 3
    assert stacked[1].metrics[-1]["train_loss"] is None  # the non-finite loss's mean


@pytest.mark.parametrize(("change", "reason"), [
    ({"model": "deep_mlp", "model_kwargs": {"width": 8, "dropout": 0.5}},
     r"blocks?.*dropout|dropout.*random masks"),
    ({"optimizer": "adam"}, "optimizer 'adam'"),
    ({"weight_decay": 1e-3, "decay_weights_only": True}, "decay_weights_only"),
    ({"norm": "bn", "norm_kwargs": {"momentum": None}}, "momentum=None"),
    ({"norm": "ghost"}, "GhostBatchNorm1d.*not a layer the stacked engine knows"),
])
def test_what_cannot_be_proven_exact_is_refused(digits: Any, change: dict[str, Any],
                                               reason: str) -> None:
    cfgs = configs((0, 1), **{"model": "paper_mlp", **change})
    why = stack_refusal(cfgs)
    assert why is not None and re.search(reason, why), why
    with pytest.raises(ValueError, match="cannot train these configs stacked exactly"):
        train_stacked(cfgs, digits)


def test_configs_must_differ_only_by_seed() -> None:
    a, b = configs((0, 1), model="paper_mlp")
    assert stack_refusal([a, replace(b, lr=0.1)]) == \
        "the configs differ by more than the seed (lr)"
    assert stack_refusal([a, replace(b, seed=0)]) == "two configs with the same seed"
    assert stack_refusal([]) == "no configs"
