"""The training loop: one run of one model on one dataset, with metrics and a checkpoint.

(Interface fixed first so that the lab, the toolkit and the distributed launcher can build
on it; the loop itself lands with the training issue.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Logged in full with every result.

    Exactly one of ``steps`` / ``epochs`` is set (``steps`` wins if both are given by a
    caller that means it; the CLI refuses both). ``model_kwargs`` go to the model builder
    (``depth``, ``width``, ``dropout`` …), ``norm_kwargs`` to every norm layer
    (``momentum``, ``virtual_batch_size`` …). ``init_scale`` multiplies every conv/linear
    weight after the default init (the init-sensitivity claim). ``train_subset`` keeps
    the first N training images (deterministic). ``eval_train`` also reports accuracy and
    loss on the (subset of the) training split at each evaluation.
    """

    model: str = "seed_cnn"
    norm: str = "bn"
    placement: str = "before"
    dataset: str = "mnist"
    steps: int | None = 500
    epochs: float | None = None
    batch_size: int = 64
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100
    seed: int = 0
    threads: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    init_scale: float = 1.0
    train_subset: int | None = None
    eval_train: bool = False
    sync_bn: bool = False
