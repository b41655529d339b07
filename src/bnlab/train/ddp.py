"""Data-parallel training: the process group, each rank's slice and the global-batch loss.

Under torchrun (``WORLD_SIZE`` > 1) :func:`setup` joins the process group (gloo on CPU,
nccl on CUDA) with ``config.dist_timeout_s`` as the timeout of every collective.
``batch_size`` is the *global* batch: every rank draws the same permutation and takes its
contiguous ``np.array_split``-style slice of each global batch (:func:`slice_bounds`), so
the ranks together see exactly the samples one process would. Each rank's loss is the
*sum* over its slice times ``W / global_n`` (= its mean times ``local_n · W / global_n``),
so DDP's gradient average is the global-batch mean gradient even for uneven slices
(:func:`batch_loss`). :func:`share` hands rank 0's result to every rank, and
:func:`teardown` waits for every rank before it closes the group, so that no rank tears
down its connections while a peer still uses them.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bnlab.nn import convert_sync_batchnorm
from bnlab.train.config import TrainConfig

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (one process: world 1, rank 0)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(config: TrainConfig) -> DistInfo:
    """Join the group described by torchrun's environment (already joined: reuse it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if config.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.dist_timeout_s))
    return DistInfo(world=dist.get_world_size(), rank=dist.get_rank(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)


def teardown(info: DistInfo, *, completed: bool) -> None:
    """Close the group this process opened.

    After a completed run every rank first waits for the others (a barrier), so that none
    closes its gloo connections while a peer still uses them: rank 0 evaluates and writes
    the files after the last step, and a rank that had closed its side meanwhile could
    abort in gloo's teardown. Objects that still hold the group (the DDP wrapper, autograd
    nodes of the last step) are collected before it is destroyed, not at interpreter exit.
    """
    if not info.owns_group:
        return
    try:
        if completed:
            dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def device_for(config: TrainConfig, info: DistInfo) -> torch.device:
    if config.device == "cuda":
        return torch.device("cuda", info.local_rank if info.world > 1 else 0)
    return torch.device("cpu")


def slice_bounds(global_n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of a global batch, as ``np.array_split`` cuts it."""
    base, extra = divmod(global_n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def wrap(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device
         ) -> tuple[nn.Module, nn.Module]:
    """(model, net): with W > 1 the model (its BN layers synchronised with ``sync_bn``)
    and its DistributedDataParallel wrapper; with one process the model twice."""
    if info.world <= 1:
        return model, model
    if config.sync_bn:
        model = convert_sync_batchnorm(model)
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net


def batch_loss(logits: torch.Tensor, y: torch.Tensor, info: DistInfo, global_n: int
               ) -> tuple[torch.Tensor, float]:
    """(loss to differentiate, mean loss over the global batch) for this rank's slice."""
    if info.world <= 1:
        loss = F.cross_entropy(logits, y)
        return loss, float(loss.detach())
    loss = F.cross_entropy(logits, y, reduction="sum") * (info.world / global_n)
    total = F.cross_entropy(logits.detach(), y, reduction="sum")
    dist.all_reduce(total)
    return loss, float(total) / global_n


def share(value: T, info: DistInfo) -> T:
    """Rank 0's ``value`` on every rank (``value`` is ignored on the others)."""
    if info.world <= 1:
        return value
    box: list[Any] = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
