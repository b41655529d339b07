"""input-scale: the verdict rule on synthetic results, and the identity it probes (BN's
output does not depend on the scale of what feeds it; no-BN's does) against torch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bnlab.data import DatasetSplits
from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.experiments.input_scale import (
    PAIRED,
    block_outputs,
    pre_norm_layers,
    scale_probe,
    scaled_inputs,
)
from bnlab.train import TrainConfig, build

torch.set_num_threads(1)


def results(acc: Any) -> list[RunResult]:
    """Every full-profile run: probes report zero change, training ``acc(spec)``."""
    exp = get_experiment("input-scale")
    cfg = exp.config("full")
    out = []
    for spec in exp.runs(cfg, "mnist"):
        if spec.group["run"] == "probe":
            zeros = {f"{c:g}": [0.0, 0.0] for c in cfg.scales}
            summary: dict[str, Any] = {"test_acc": 0.1,
                                       "probe": {"input": zeros, "weights": zeros}}
        else:
            summary = {"test_acc": acc(spec)}
        out.append(RunResult(spec, spec.run_id("input-scale"), summary, []))
    return out


@pytest.mark.parametrize(
    ("acc", "expected"),
    [
        # no BN loses 20 points at the extreme scales, BN nothing: spread diff 20
        (lambda s: 0.97 - (0.2 + 0.001 * s.seed if s.group["norm"] == "none"
                           and s.group["scale"] != 1.0 else 0.0), "supported"),
        # both lose the same 3 points at the extremes: spread diff 0
        (lambda s: 0.97 - (0.03 + 0.001 * s.seed * (s.group["norm"] == "bn")
                           if s.group["scale"] != 1.0 else 0.0), "not supported"),
        # the difference swings with the seed: +30, −20, +30, −20, +30
        (lambda s: 0.97 - ((0.3 if s.seed % 2 == 0 else 0.0) if s.group["norm"] == "none"
                           else (0.2 if s.seed % 2 else 0.0)) * (s.group["scale"] == 100.0),
         "inconclusive"),
    ],
)
def test_rule(acc: Any, expected: str) -> None:
    exp = get_experiment("input-scale")
    a = exp.analyse(exp.config("full"), results(acc))
    assert a.verdict == expected
    assert a.effect["threshold_pp"] == PAIRED.threshold
    if expected == "supported":
        assert a.effect["spread_diff_pp"] == pytest.approx(20.2)
        assert a.effect["spread_bn_pp"] == pytest.approx(0.0)
    assert "95 % CI" in a.headline


def model_and_batch(norm: str, dtype: torch.dtype = torch.float32) -> tuple[Any, torch.Tensor]:
    model: Any = build(TrainConfig(model="paper_mlp", norm=norm, seed=3), (1, 6, 6), 10)
    model.to(dtype).train()
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return model, x


def negligible_eps(model: Any) -> Any:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-30  # torch refuses 0; this is 0 next to any variance here
    return model


def test_bn_output_is_invariant_to_the_input_and_weight_scale_no_bn_is_not() -> None:
    """float32, as trained, BN's eps made negligible (the pure identity): BN's blocks and logits
    change by float rounding only when the inputs or every pre-BN layer's weights are
    multiplied by 0.01, 10 or 100; without BN every block and the logits change a lot."""
    for norm, check in (("bn", lambda v: v < 1e-5), ("none", lambda v: v > 1e-2)):
        model, x = model_and_batch(norm)
        model = negligible_eps(model)
        before = copy.deepcopy(model.state_dict())
        probe = scale_probe(model, x, (1.0, 0.01, 10.0, 100.0))
        for what in ("input", "weights"):
            assert probe[what]["1"] == [0.0] * 4  # three blocks and the logits
            for c in ("0.01", "10", "100"):
                changes = probe[what][c]
                assert len(changes) == 4
                assert all(check(v) for v in changes), (norm, what, c, changes)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # not changed


def test_eps_makes_it_bn_with_eps_over_c_squared() -> None:
    """The exact form with eps, against torch's batch_norm in float64:
    BN_eps(c·z) = BN_{eps/c²}(z); and the whole BN network on c·x equals the same network
    with its first BN's eps divided by c² on x (the layers after it see the same input)."""
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for c in (0.01, 1.0, 100.0):
        lhs = F.batch_norm(c * z, None, None, training=True, eps=1e-5)
        rhs = F.batch_norm(z, None, None, training=True, eps=1e-5 / c**2)
        assert torch.allclose(lhs, rhs, rtol=0, atol=1e-10)
    model, x = model_and_batch("bn", torch.float64)
    for c in (0.01, 100.0):
        first = copy.deepcopy(model)  # inputs × c: only the first BN sees c·z
        first.hidden1.norm.eps = model.hidden1.norm.eps / c**2
        every = copy.deepcopy(model)  # every pre-BN layer's weights × c: every BN sees c·z
        for block in (every.hidden1, every.hidden2, every.hidden3):
            block.norm.eps = model.hidden1.norm.eps / c**2
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for layer in pre_norm_layers(scaled):
                layer.get_parameter("weight").mul_(c)
        for pairs in (zip(block_outputs(model, c * x), block_outputs(first, x), strict=True),
                      zip(block_outputs(scaled, x), block_outputs(every, x), strict=True)):
            for a, b in pairs:
                assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # and eps is not negligible for a tiny scale: it does change BN's output then
    assert scale_probe(model, x, (0.01,))["input"]["0.01"][0] > 1e-3


def test_pre_norm_layers_are_the_linear_layers_before_each_norm() -> None:
    model, _ = model_and_batch("bn")
    assert pre_norm_layers(model) == [model.hidden1.layer, model.hidden2.layer,
                                      model.hidden3.layer]


def test_scaled_inputs_maps_copies_only() -> None:
    x = torch.arange(12.0).reshape(3, 1, 2, 2)
    y = torch.tensor([0, 1, 2])
    data = DatasetSplits("digits", TensorDataset(x, y), TensorDataset(x[:2], y[:2]), "test",
                         (1, 2, 2), 3, 0.5, 2.0)
    out = scaled_inputs(data, 2.0, 0.5)
    assert torch.equal(out.train.tensors[0], 2.0 * x + 0.5)
    assert torch.equal(out.test.tensors[0], 2.0 * x[:2] + 0.5)
    assert torch.equal(out.train.tensors[1], y)
    assert torch.equal(data.train.tensors[0], torch.arange(12.0).reshape(3, 1, 2, 2))
    assert (out.name, out.mean, out.std) == ("digits", 0.5, 2.0)


def test_the_probe_and_the_training_are_planned_per_norm_scale_and_seed() -> None:
    exp = get_experiment("input-scale")
    cfg = exp.config("quick")
    runs = exp.runs(cfg, "mnist")
    probes = [r for r in runs if r.kind == "probe-scale"]
    trains = [r for r in runs if r.kind == "train-scaled-inputs"]
    assert len(probes) == 2 * len(cfg.seeds)
    assert len(trains) == 2 * len(cfg.scales) * len(cfg.seeds)
    assert {r.params["input_scale"] for r in trains} == set(cfg.scales)
    assert all(isinstance(r, RunSpec) for r in runs)
