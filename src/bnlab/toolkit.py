"""The toolkit's checkpoint commands: ``bnlab recalibrate`` and ``bnlab fold``.

These sit above :mod:`bnlab.train` (they load and save its checkpoints), so they live here
and not in :mod:`bnlab.nn`, which must not import the training code. The checkpoint format,
plain and folded, is :mod:`bnlab.train.checkpoint`'s: a folded file is written with
``format="bnlab-folded"`` and read back by :func:`load_folded`. ``bnlab eval`` reads
``bnlab train`` checkpoints only; use :func:`load_folded` for folded ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bnlab.errors import BnlabError
from bnlab.train.checkpoint import (
    FOLDED,
    load_checkpoint,
    load_folded,
    read_checkpoint_info,
    save_checkpoint,
)
from bnlab.train.runfiles import checkpoint_path

__all__ = ["fold_checkpoint", "load_folded", "recalibrate_checkpoint"]


def recalibrate_checkpoint(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    num_batches: int | None = None,
    batch_size: int = 256,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> str:
    """Recalibrate a checkpoint's BN statistics on a training split; return the line to print.

    The first ``num_batches`` batches (all by default) of the training split, in order, feed
    :func:`bnlab.nn.recalibrate_bn`. Test accuracy is reported before and after. The result
    is written (atomically) to ``out``, default ``<name>.recalibrated.safetensors`` next to
    the checkpoint.
    """
    from bnlab.data import load_dataset
    from bnlab.nn import recalibrate_bn
    from bnlab.train import evaluate

    path = checkpoint_path(path)
    info = read_checkpoint_info(path)
    model, config = load_checkpoint(path)
    name = dataset or config.dataset
    data = load_dataset(name, data_dir, download=download)
    if tuple(data.in_shape) != tuple(info.in_shape):
        raise BnlabError(
            f"checkpoint {path} expects {tuple(info.in_shape)} images, {name} has "
            f"{data.in_shape}"
        )
    x_train = data.train.tensors[0]
    batches = torch.split(x_train, batch_size)
    _, acc_before = evaluate(model, data.test)
    try:
        recalibrate_bn(model, batches, num_batches=num_batches, progress=progress)
    except ValueError as exc:
        raise BnlabError(f"cannot recalibrate {path}: {exc}") from None
    used = min(len(x_train), batch_size * (num_batches or len(batches)))
    target = Path(out) if out is not None else path.with_suffix(".recalibrated.safetensors")
    _, acc_after = evaluate(model, data.test)
    save_checkpoint(target, model, config, in_shape=info.in_shape,
                    num_classes=info.num_classes)
    return (
        f"recalibrated BN statistics of {path} on {used} {name} training images; test "
        f"accuracy {100 * acc_before:.2f} % -> {100 * acc_after:.2f} %; wrote {target}"
    )


def fold_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Fold a checkpoint's BN layers (:func:`bnlab.nn.fold_bn`), save it, return a line."""
    from bnlab.nn import fold_bn

    path = checkpoint_path(path)
    info = read_checkpoint_info(path)
    model, config = load_checkpoint(path)
    folded, report = fold_bn(model, report=True)
    x = torch.randn(8, *info.in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((folded(x) - model(x)).abs().max())
    save_checkpoint(out, folded, config, in_shape=info.in_shape, num_classes=info.num_classes,
                    format=FOLDED, folded_from=path)
    pairs = getattr(folded, "folded_pairs", 0)
    others = len(report.entries) - pairs
    unfolded = f" ({others} other BN layer(s): {_actions(report)})" if others else ""
    return (
        f"folded {pairs} Conv/Linear+BN pair(s) of {path} ({config.model}, norm={config.norm})"
        f"{unfolded}; max |folded - original| on a random batch {diff:.2e}; wrote {out}"
    )


def _actions(report: Any) -> str:
    """'2 affine, 1 left' for the entries of a fold report that were not folded."""
    counts: dict[str, int] = {}
    for entry in report.entries:
        if entry.action != "folded":
            counts[entry.action] = counts.get(entry.action, 0) + 1
    return ", ".join(f"{n} {action}" for action, n in counts.items())
