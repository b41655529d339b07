"""The depth claim's rule on synthetic results, and the residual option of deep_mlp: shapes,
the block against its formula, and residual=False bit-identical to the plain build."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.errors import BnlabError
from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunContext, RunResult, RunSpec
from bnlab.experiments.depth import first_layer_grad_norm, init_grads_run
from bnlab.models import build_model
from bnlab.models.layers import Block
from bnlab.models.mlp import DeepMLP, ResidualBlock
from bnlab.train import TrainConfig, build
from bnlab.train.config import ConfigError, validate_config

Outcome = Callable[[RunSpec], dict[str, Any]]


def results(outcome: Outcome, profile: str = "full") -> list[RunResult]:
    exp = get_experiment("depth")
    cfg = exp.config(profile)
    out = []
    for spec in exp.runs(cfg, "mnist"):
        if spec.kind == "init-grads":
            summary: dict[str, Any] = {"test_acc": None, "grad_norm_init": {
                str(d): 1.0 for d in cfg.depths}}
        else:
            summary = outcome(spec)
        out.append(RunResult(spec, spec.run_id("depth"), summary, [{"step": 1}]))
    return out


def analyse(outcome: Outcome) -> Any:
    exp = get_experiment("depth")
    return exp.analyse(exp.config("full"), results(outcome))


def test_depth_rule_reads_the_residual_net_at_the_largest_depth() -> None:
    def residual_needs_bn(spec: RunSpec) -> dict[str, Any]:
        g = spec.group
        if g["depth"] == 100 and g["norm"] == "none":
            return {"test_acc": 0.1 + 0.001 * spec.seed, "diverged": g["arch"] == "residual"}
        if g["depth"] == 100 and g["arch"] == "plain":
            return {"test_acc": 0.11}  # plain BN fails too: decides nothing
        return {"test_acc": 0.95 - 0.002 * spec.seed}

    a = analyse(residual_needs_bn)
    assert a.verdict == "supported"
    assert a.effect["diff_pp"] == pytest.approx(85.0 - 0.2 * 2)  # diverged -> chance 10 %
    assert a.effect["plain_diff_pp"] == pytest.approx(1.0 - 0.2)
    assert a.effect["plain_ci_high_pp"] < 10.0
    assert "residual" in a.headline and "plain" in a.headline and "95 % CI" in a.headline

    def residual_fine_without_bn(spec: RunSpec) -> dict[str, Any]:
        g = spec.group
        if g["arch"] == "plain" and g["norm"] == "none" and g["depth"] == 100:
            return {"test_acc": 0.1}  # a huge plain-net effect must not decide
        return {"test_acc": 0.95 + 0.001 * spec.seed * (g["norm"] == "bn")}

    a = analyse(residual_fine_without_bn)
    assert a.verdict == "not supported" and a.effect["plain_diff_pp"] > 80

    def noisy(spec: RunSpec) -> dict[str, Any]:
        g = spec.group
        if g["arch"] == "residual" and g["norm"] == "none" and g["depth"] == 100:
            return {"test_acc": (0.1, 0.95, 0.1, 0.95, 0.5)[spec.seed]}
        return {"test_acc": 0.95}

    assert analyse(noisy).verdict == "inconclusive"


def test_depth_plans_a_probe_per_architecture_norm_and_seed() -> None:
    exp = get_experiment("depth")
    cfg = exp.config("full")
    runs = exp.runs(cfg, "mnist")
    probes = [r for r in runs if r.kind == "init-grads"]
    assert len(probes) == 2 * 2 * len(cfg.seeds)
    assert len(runs) - len(probes) == 2 * 2 * len(cfg.depths) * len(cfg.seeds)
    assert all(r.kind == "train" for r in runs if r not in probes)
    assert max(cfg.depths) >= 100
    assert {r.config.model_kwargs["residual"] for r in runs} == {True, False}


def test_init_grads_probe_measures_the_first_layer_of_each_depth() -> None:
    from bnlab.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits")
    config = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", seed=3,
                         model_kwargs={"depth": 5, "width": 8, "residual": True})
    spec = RunSpec({"arch": "residual"}, 3, config, kind="init-grads",
                   params={"depths": [2, 5]})
    out = init_grads_run(spec, RunContext(data))
    x, y = data.train.tensors[0][:256], data.train.tensors[1][:256]
    for depth in (2, 5):
        cfg = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", seed=3,
                          model_kwargs={"depth": depth, "width": 8, "residual": True})
        assert out.summary["grad_norm_init"][str(depth)] == first_layer_grad_norm(cfg, data)
        model = build(cfg, data.in_shape, data.num_classes)
        F.cross_entropy(model(x), y).backward()
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        assert first.weight.grad is not None
        assert first_layer_grad_norm(cfg, data) == float(first.weight.grad.norm())
    assert "test_acc" in out.summary and out.metrics[0]["step"] == 0


# --------------------------------------------------------------------------- the model


class PlainDeepMLP(nn.Module):
    """deep_mlp as it is built without the residual option, written out again."""

    def __init__(self, norm: str, depth: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(nn.Linear(64 if i == 0 else width, width), width, 1, norm=norm,
                  placement="before", act=nn.ReLU())
            for i in range(depth)
        )
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(width, 10)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_residual_false_is_bit_identical_to_the_plain_build(norm: str) -> None:
    torch.manual_seed(5)
    reference = PlainDeepMLP(norm, 4, 12)
    torch.manual_seed(5)
    model = DeepMLP(norm=norm, in_shape=(1, 8, 8), depth=4, width=12)
    torch.manual_seed(5)
    default = DeepMLP(norm=norm, in_shape=(1, 8, 8), depth=4, width=12, residual=False)
    ref_state = reference.state_dict()
    for m in (model, default):
        state = m.state_dict()
        assert list(state) == list(ref_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
    x = torch.randn(6, 1, 8, 8)
    expected = torch.flatten(x, 1)
    for block in reference.blocks:
        expected = block(expected)
    assert torch.equal(model(x), reference.head(expected))


def test_residual_blocks_compute_x_plus_linear_relu_bn_x() -> None:
    torch.manual_seed(0)
    model = DeepMLP(norm="bn", in_shape=(1, 8, 8), depth=4, width=6, residual=True).double()
    assert isinstance(model.blocks[0], Block)
    assert all(isinstance(b, ResidualBlock) for b in model.blocks[1:])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 + 1  # depth hidden Linear layers + the head
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    y = model(x)
    assert y.shape == (10, 10)
    h = model.blocks[0](torch.flatten(x, 1))
    for block in model.blocks[1:]:
        assert isinstance(block, ResidualBlock)
        bn = block.norm
        assert isinstance(bn, nn.BatchNorm1d)
        normed = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        h = h + F.linear(torch.relu(normed), block.layer.weight, block.layer.bias)
    torch.testing.assert_close(y, model.head(h), rtol=1e-12, atol=1e-12)


def test_residual_without_norm_is_x_plus_linear_relu_x() -> None:
    torch.manual_seed(1)
    block = ResidualBlock(5, norm="none", norm_kwargs=None).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + block.layer(torch.relu(x)), rtol=0, atol=0)


def test_residual_option_is_declared_and_checked() -> None:
    good = TrainConfig(model="deep_mlp", dataset="digits",
                       model_kwargs={"depth": 3, "width": 8, "residual": True})
    validate_config(good)
    bad = TrainConfig(model="deep_mlp", dataset="digits", model_kwargs={"residual": "yes"})
    with pytest.raises(ConfigError, match="residual must be true or false"):
        validate_config(bad)
    with pytest.raises(BnlabError, match="residual must be true or false"):
        build_model("deep_mlp", residual=1)
