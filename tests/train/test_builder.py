"""One model builder: training, the depth probe and covariate shift start from the same model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bnlab.data import load_dataset
from bnlab.train import TrainConfig, build, train

# Non-default norm options and init scale: the depth probe used to drop both.
CONFIG = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", steps=1, eval_every=1,
                     seed=7, threads=1, model_kwargs={"depth": 3, "width": 16},
                     norm_kwargs={"eps": 0.5, "momentum": 0.3}, init_scale=0.25)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _training_start(config: TrainConfig, data) -> dict[str, torch.Tensor]:
    """The parameters of the model `train` builds, as they are before its first update."""
    captured: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs) -> None:
        if not captured:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            captured.update({str(i): p.detach().clone() for i, p in enumerate(params)})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(config, progress=False, data=data)
    finally:
        handle.remove()
    return captured


def _norm_options(model: nn.Module) -> list[tuple[str, float, float | None]]:
    return [(type(m).__name__, m.eps, m.momentum) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_build_is_the_model_training_starts_from(digits) -> None:
    start = _training_start(CONFIG, digits)
    model = build(CONFIG, digits.in_shape, digits.num_classes)
    params = list(model.parameters())
    assert len(params) == len(start)
    assert all(torch.equal(p, start[str(i)]) for i, p in enumerate(params))
    assert _norm_options(model) == [("BatchNorm1d", 0.5, 0.3)] * 3
    plain = build(dataclasses.replace(CONFIG, init_scale=1.0))
    assert torch.equal(model.blocks[0].layer.weight, 0.25 * plain.blocks[0].layer.weight)


def test_depth_probe_uses_the_training_model(digits) -> None:
    """The gradient probe's value is the gradient of the model training starts from (its
    parameters, its norm options: eps changes a train-mode forward) on the probe batch."""
    from bnlab.experiments import depth

    start = _training_start(CONFIG, digits)
    reference = build(CONFIG)
    with torch.no_grad():
        for i, p in enumerate(reference.parameters()):
            p.copy_(start[str(i)])
    x = digits.train.tensors[0][:depth.GRAD_BATCH]
    y = digits.train.tensors[1][:depth.GRAD_BATCH]
    F.cross_entropy(reference.train()(x), y).backward()
    expected = float(reference.blocks[0].layer.weight.grad.norm())
    assert depth.first_layer_grad_norm(CONFIG, digits) == expected
    other = depth.first_layer_grad_norm(dataclasses.replace(CONFIG, norm_kwargs={}), digits)
    assert other != expected  # the probe sees the norm options


def test_covariate_shift_starts_from_the_built_model(digits) -> None:
    """Step 0's recorded accuracy is that of the built paper_mlp (same seed and weights)."""
    from bnlab.experiments import covariate_shift
    from bnlab.train import evaluate

    config = TrainConfig(model="paper_mlp", norm="bn", dataset="digits", steps=1,
                         eval_every=1, seed=4, init_scale=3.0)
    metrics = covariate_shift.train_with_percentiles(config, "torch", digits).metrics
    _, acc = evaluate(build(config), digits.test)
    assert metrics[0]["step"] == 0 and metrics[0]["test_acc"] == acc
