"""Several seeds of one model trained together in one process, exactly as separate runs.

:func:`train_stacked` takes configs that differ only by ``seed`` and trains them as one
stacked model: each seed's parameters and buffers are one slice of a stacked tensor, the
forward is ``torch.func.vmap`` over ``torch.func.functional_call`` of the model, and the
loss is the sum of the seeds' mean losses, so each slice receives exactly its own seed's
gradient. Everything else is the training loop's own code (:mod:`bnlab.train.loop`): each
seed's model is built by :func:`~bnlab.train.build` from its config (same init), draws its
batches from its own seeded generator (same order), is updated by SGD (momentum and
weight decay act element by element, so one optimizer over the stack performs each seed's
update), and is evaluated, recorded and summarised by the loop's functions on its own
model, whose tensors are views of its slices. A seed whose loss is not finite stops there
with ``diverged: true``, as :func:`~bnlab.train.train` stops, and leaves the stack; the
others go on. The numbers equal separate runs' up to float32 rounding (a batched matmul
sums in another order).

Exactness is proven only for what :func:`stack_refusal` accepts: SGD, one process, and a
model made solely of the layers in :data:`STACKABLE_LAYERS` inside the containers in
:data:`STACKABLE_CONTAINERS` (no dropout, no randomness, no Python state changed by a
forward, BN with a momentum). Anything else is refused with the reason, and the caller
trains those configs one by one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from bnlab.models.cnn import DeepCNN, MnistNet, SeedCNN
from bnlab.models.layers import Block
from bnlab.models.mlp import DeepMLP, PaperMLP, ResidualBlock
from bnlab.train import loop
from bnlab.train.builder import build, dataset_shape
from bnlab.train.config import TrainConfig, validate_config
from bnlab.train.ddp import DistInfo

STACKABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.Identity,
    nn.ReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.Flatten, nn.Dropout,
)
"""Leaf layers whose forward is a pure function of the input, the parameters and the
buffers (BN's running statistics are updated in place per slice). Matched by exact type:
a subclass may add what the check cannot see. ``nn.Dropout`` only with ``p == 0``."""

STACKABLE_CONTAINERS: tuple[type[nn.Module], ...] = (
    PaperMLP, DeepMLP, SeedCNN, MnistNet, DeepCNN, Block, ResidualBlock, nn.Sequential,
    nn.ModuleList,
)
"""Modules with children whose own forward only composes them (exact type)."""

MAX_STACK = 8
"""The most seeds the lab stacks into one run (more gains little and delays results)."""


def _differs_by_more_than_seed(configs: Sequence[TrainConfig]) -> list[str]:
    first = replace(configs[0], seed=0).to_dict()
    keys: set[str] = set()
    for c in configs[1:]:
        other = replace(c, seed=0).to_dict()
        keys |= {k for k in first if first[k] != other.get(k)}
    return sorted(keys)


def _module_refusal(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        where = name or "the model"
        kind = type(module)
        children = list(module.children())
        if children and kind not in STACKABLE_CONTAINERS:
            return f"{where} ({kind.__name__}) is not a container the stacked engine knows"
        if not children and kind not in STACKABLE_LAYERS:
            return f"{where} ({kind.__name__}) is not a layer the stacked engine knows"
        if isinstance(module, nn.Dropout) and module.p != 0:
            return f"{where} is dropout (p={module.p}): its random masks would differ per seed"
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.momentum is None:
            return f"{where} is BN with momentum=None (a cumulative average)"
    return None


def stack_refusal(configs: Sequence[TrainConfig]) -> str | None:
    """Why ``configs`` cannot be trained stacked exactly, or ``None`` if they can."""
    if not configs:
        return "no configs"
    if len({c.seed for c in configs}) != len(configs):
        return "two configs with the same seed"
    differing = _differs_by_more_than_seed(configs)
    if differing:
        return f"the configs differ by more than the seed ({', '.join(differing)})"
    config = configs[0]
    if config.optimizer != "sgd":
        return f"optimizer {config.optimizer!r} (only SGD is proven exact here)"
    if config.decay_weights_only:
        return "decay_weights_only (one parameter group is stacked here)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "a distributed run (WORLD_SIZE > 1)"
    in_shape, classes = dataset_shape(config)
    return _module_refusal(build(config, in_shape, classes, device="meta"))


def worth_stacking(configs: Sequence[TrainConfig]) -> bool:
    """Whether the lab should train ``configs`` stacked: exact (:func:`stack_refusal`
    accepts them), several, and faster than one by one, which holds for models without
    convolutions (a stacked conv is a grouped conv, compute-bound: stacked seed_cnn steps
    were measured slower than separate ones at one thread, while MLP steps, dominated by
    per-operation overhead, are faster; see ``benchmarks/bench_lab.py``)."""
    if len(configs) < 2 or stack_refusal(configs) is not None:
        return False
    in_shape, classes = dataset_shape(configs[0])
    model = build(configs[0], in_shape, classes, device="meta")
    return not any(isinstance(m, nn.Conv2d) for m in model.modules())


class _Stack:
    """The stacked parameters and buffers of some seeds' models, and their optimizer.
    Each model's tensors are views of its slice, so the loop's functions see its state."""

    def __init__(self, runs: list[loop._Run], momentum: dict[str, torch.Tensor] | None = None
                 ) -> None:
        models = [r.model for r in runs]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
                       .requires_grad_() for n, _ in models[0].named_parameters()}
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                        for n, _ in models[0].named_buffers()}
        self.optimizer = loop._make_optimizer(runs[0].config, list(self.params.values()))
        for n, buf in (momentum or {}).items():
            self.optimizer.state[self.params[n]]["momentum_buffer"] = buf
        for i, m in enumerate(models):
            _point(m, {n: p.detach()[i] for n, p in self.params.items()},
                   {n: b[i] for n, b in self.buffers.items()})

    def momentum(self, keep: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.params.items():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[n] = buf[keep].clone()
        return out


def _point(model: nn.Module, params: dict[str, torch.Tensor],
           buffers: dict[str, torch.Tensor]) -> None:
    """Make ``model``'s parameters and buffers these tensors (shared storage)."""
    for n, p in model.named_parameters():
        p.data = params[n]
    for n, _ in model.named_buffers():
        owner, _, leaf = n.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffers[n]


def _detach(model: nn.Module) -> None:
    """Give ``model`` its own copies of its tensors (it leaves the stack)."""
    _point(model, {n: p.detach().clone() for n, p in model.named_parameters()},
           {n: b.clone() for n, b in model.named_buffers()})


def train_stacked(configs: Sequence[TrainConfig], data: Any) -> list[loop.TrainResult]:
    """Train ``configs`` (differing only by ``seed``) together; one result per config, in
    order, equal to :func:`bnlab.train.train`'s with ``out_dir=None`` up to float32
    rounding. Each summary's ``wall_time_s``, ``train_time_s`` and ``step_time_ms`` are its
    share (1/S) of the group's, and ``stacked`` is S. ``data``: the
    :class:`~bnlab.data.DatasetSplits` of the configs' dataset. ValueError (with
    :func:`stack_refusal`'s reason) for configs that cannot be stacked exactly."""
    configs = list(configs)
    reason = stack_refusal(configs)
    if reason is not None:
        raise ValueError(f"cannot train these configs stacked exactly: {reason}")
    t_start = time.perf_counter()
    for config in configs:
        validate_config(config)
    threads = torch.get_num_threads()
    try:
        runs = [loop._prepare(c, DistInfo(), None, progress=False, overwrite=False, data=data,
                              data_dir=None, download=False, t_start=t_start) for c in configs]
        t_loop = time.perf_counter()
        _steps(runs, t_loop)
        results = [loop._finish(r) for r in runs]
        for r in runs:
            _detach(r.model)
        share = len(runs)
        wall, train_time = time.perf_counter() - t_start, time.perf_counter() - t_loop
        for result in results:
            steps = result.summary["steps"]
            result.summary.update({
                "wall_time_s": wall / share, "train_time_s": train_time / share,
                "step_time_ms": 1000.0 * train_time / share / max(steps, 1), "stacked": share,
            })
        return results
    finally:
        torch.set_num_threads(threads)


def _steps(runs: list[loop._Run], t_loop: float) -> None:
    """Every optimizer step of every run (until it ends or diverges), recording each run's
    metrics rows at its evaluation steps, as the loop does."""
    net = runs[0].model

    def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, (params, buffers), (x,))

    batched = vmap(forward)
    per_seed_loss = vmap(F.cross_entropy)
    for r in runs:
        r.model.train()
        r.t_loop = t_loop
    active = list(runs)
    stack = _Stack(active)
    config = runs[0].config
    batch, total = config.batch_size, runs[0].total_steps
    while active and active[0].step < total:
        idx = []
        for r in active:
            pos = r.step % r.steps_per_epoch
            if pos == 0:
                r.perm = torch.randperm(len(r.x_train), generator=r.generator)
            idx.append(r.perm[pos * batch:(pos + 1) * batch])
        rows = torch.stack(idx)
        x, y = runs[0].x_train[rows], runs[0].y_train[rows]
        losses = per_seed_loss(batched(stack.params, stack.buffers, x), y)
        values = losses.tolist()
        finite = [math.isfinite(v) for v in values]
        for r, v, ok in zip(active, values, finite, strict=True):
            r.loss_sum += v
            r.loss_count += 1
            if not ok:
                r.diverged_at = r.step + 1
                _detach(r.model)  # its state before this step's update, as train stops
        stack.optimizer.zero_grad(set_to_none=True)
        torch.where(torch.tensor(finite), losses, 0.0).sum().backward()
        stack.optimizer.step()
        if not all(finite):
            keep = [i for i, ok in enumerate(finite) if ok]
            active = [active[i] for i in keep]
            if active:
                stack = _Stack(active, stack.momentum(keep))
        for r, v in zip(active, [v for v, ok in zip(values, finite, strict=True) if ok],
                        strict=True):
            r.step += 1
            r.last_loss = v
            if r.step % config.eval_every == 0 or r.step == total:
                loop._record(r)
