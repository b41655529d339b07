"""The one way to build a model from a :class:`~bnlab.train.config.TrainConfig`.

:func:`build` seeds Python's, NumPy's and torch's global generators with ``config.seed``,
builds ``config.model`` with its norm, placement, ``norm_kwargs`` and ``model_kwargs``, and
multiplies every conv/linear weight by ``config.init_scale``: exactly the model a training
run starts from. Training, checkpoint loading, the toolkit commands and every experiment
build through it, so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch import nn

from bnlab.train.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy's global generator (for model or norm code that draws from
    it; modulo 2**32, its range) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def dataset_shape(config: TrainConfig) -> tuple[tuple[int, int, int], int]:
    """(in_shape, num_classes) of ``config.dataset``."""
    from bnlab.data import DATASET_INFO

    return DATASET_INFO[config.dataset]


def build(
    config: TrainConfig,
    in_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    *,
    seeded: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The model a run of ``config`` starts from (train mode), on ``device`` (CPU default).

    ``in_shape``/``num_classes`` default to the dataset's. ``seeded=False`` leaves the
    global generators alone, for a model whose weights are loaded right after. On the
    ``meta`` device nothing is allocated (and nothing seeded): shapes only.
    """
    from bnlab.models import build_model, scale_init

    if in_shape is None or num_classes is None:
        in_shape, num_classes = dataset_shape(config)
    meta = device is not None and torch.device(device).type == "meta"
    if seeded and not meta:
        seed_everything(config.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(config.model, norm=config.norm, placement=config.placement,
                            in_shape=tuple(in_shape),  # type: ignore[arg-type]
                            num_classes=num_classes, norm_kwargs=dict(config.norm_kwargs),
                            **dict(config.model_kwargs))
    scale_init(model, config.init_scale)
    if seeded and not meta:
        from bnlab.nn.noisy import reseed_noise

        reseed_noise(model, config.seed)  # noisy_bn layers: their own streams, per run seed
    if device is not None and not meta:
        model.to(device)
    return model


def state_shapes(config: TrainConfig, in_shape: tuple[int, ...], num_classes: int
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor in the state dict of the model ``config`` describes,
    from a build on the ``meta`` device (no memory is allocated)."""
    model = build(config, in_shape, num_classes, device="meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

