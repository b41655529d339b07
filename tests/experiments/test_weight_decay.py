"""weight-decay: the verdict rule on synthetic results, and L2 on conv/linear weights only
(``TrainConfig.decay_weights_only``) against torch's SGD with and without decay."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.train import TrainConfig
from bnlab.train.builder import build
from bnlab.train.loop import optimizer_for, weight_groups

Results = Callable[..., list[RunResult]]


def outcome_with(gain: dict[str, float], jitter: float = 0.0001
                 ) -> Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Accuracy 0.95 + 0.001·seed, plus ``gain[norm]`` with weight decay; without BN the
    gain alternates by ± ``jitter`` from seed to seed."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        acc = 0.95 + 0.001 * spec.seed
        if spec.group["weight_decay"]:
            acc += gain[spec.group["norm"]]
            if spec.group["norm"] == "none":
                acc += jitter * (-1) ** spec.seed
        return {"test_acc": acc}, [{"step": 1, "test_acc": acc}]
    return outcome


@pytest.mark.parametrize(
    ("gain", "jitter", "expected"),
    [({"none": 0.02, "bn": 0.0}, 0.0001, "supported"),  # L2 adds 2 points, only without BN
     ({"none": 0.01, "bn": 0.01}, 0.0001, "not supported"),  # L2 adds as much with BN
     ({"none": -0.01, "bn": 0.01}, 0.0001, "not supported"),  # it adds more with BN
     ({"none": 0.004, "bn": 0.0}, 0.003, "inconclusive")],  # 0.46, CI ~0.05 to 0.87
)
def test_weight_decay_rule(synthetic_results: Results, gain: dict[str, float], jitter: float,
                           expected: str) -> None:
    exp = get_experiment("weight-decay")
    a = exp.analyse(exp.config("full"), synthetic_results("weight-decay",
                                                          outcome_with(gain, jitter)))
    assert a.verdict == expected
    assert a.effect["gain_none_pp"] - a.effect["gain_bn_pp"] == pytest.approx(
        a.effect["gain_diff_pp"])
    assert a.effect["gain_bn_pp"] == pytest.approx(100 * gain["bn"])
    assert "95 % CI" in a.headline


def test_a_difference_made_by_l2_hurting_bn_is_said_so(synthetic_results: Results) -> None:
    """L2 changes nothing without BN and costs a point with BN: the difference is +1 point
    (supported by the rule), and a note says that no need for L2 was shown."""
    exp = get_experiment("weight-decay")
    a = exp.analyse(exp.config("full"), synthetic_results(
        "weight-decay", outcome_with({"none": 0.0, "bn": -0.01})))
    assert a.verdict == "supported"
    assert any("L2 does not help" in n for n in a.notes)
    helps = exp.analyse(exp.config("full"), synthetic_results(
        "weight-decay", outcome_with({"none": 0.02, "bn": 0.0})))
    assert helps.notes == []


def test_weight_decay_runs_decay_only_the_weights_and_pair_by_seed() -> None:
    exp = get_experiment("weight-decay")
    cfg = exp.config("full")
    runs = exp.runs(cfg, "fashion-mnist")
    assert {r.config.decay_weights_only for r in runs} == {True}
    assert {r.config.weight_decay for r in runs} == {0.0, cfg.weight_decay}
    assert {r.config.dataset for r in runs} == {"fashion-mnist"}
    quick = exp.config("quick")
    assert quick.seeds == cfg.seeds[:3] and quick.steps == cfg.steps  # full's protocol


def _one_step(config: TrainConfig, model: torch.nn.Module, x: torch.Tensor,
              y: torch.Tensor) -> torch.nn.Module:
    opt = optimizer_for(config, model)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model


@pytest.mark.parametrize("model", ["seed_cnn", "deep_mlp"])
def test_decay_weights_only_decays_conv_and_linear_weights_and_nothing_else(model: str) -> None:
    """Each parameter after an SGD step is exactly what torch's SGD gives it with
    weight_decay wd (conv/linear weights) or 0 (biases, BN scale and shift)."""
    torch.manual_seed(0)
    base = TrainConfig(model=model, norm="bn", lr=0.1, momentum=0.9, weight_decay=0.5)
    net = build(base, (1, 8, 8), 10)
    with torch.no_grad():  # no parameter at zero, where decay would change nothing
        for p in net.parameters():
            p.add_(0.1 * torch.rand_like(p) + 0.05)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    ours = _one_step(TrainConfig(**{**base.to_dict(), "decay_weights_only": True}),
                     copy.deepcopy(net), x, y)
    decayed = _one_step(base, copy.deepcopy(net), x, y)
    plain = _one_step(TrainConfig(**{**base.to_dict(), "weight_decay": 0.0}),
                      copy.deepcopy(net), x, y)
    weights = {f"{name}.weight" for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    assert weights and any(n.endswith("norm.weight") for n, _ in net.named_parameters())
    for (name, p), d, q in zip(ours.named_parameters(), decayed.parameters(),
                               plain.parameters(), strict=True):
        expected = d if name in weights else q
        assert torch.equal(p, expected), name
        assert not torch.equal(d, q), name  # decay changed every parameter it touched


def test_weight_groups_hold_every_parameter_once_and_default_is_unchanged() -> None:
    net = build(TrainConfig(model="seed_cnn", norm="bn"), (1, 8, 8), 10)
    groups = weight_groups(net)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    opt = optimizer_for(TrainConfig(weight_decay=0.1), net)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    assert TrainConfig.from_json(TrainConfig(decay_weights_only=True).to_json()) == (
        TrainConfig(decay_weights_only=True))
