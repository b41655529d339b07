"""The toolkit's checkpoint commands: ``bnlab recalibrate`` and ``bnlab fold``.

These sit above :mod:`bnlab.train` (they load and save its checkpoints), so they live here
and not in :mod:`bnlab.nn`, which must not import the training code.

A folded checkpoint is a safetensors file of the folded model's state dict with metadata
``format="bnlab-folded"`` plus the original ``config``, ``in_shape`` and ``num_classes``.
The folded structure is a pure function of the architecture, so :func:`load_folded` rebuilds
it as ``fold_bn(build_model(config))`` and loads the tensors (strictly, no unpickling).
``bnlab eval`` reads ``bnlab train`` checkpoints only; use :func:`load_folded` for these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab._io import atomic_path
from bnlab.errors import BnlabError
from bnlab.train import TrainConfig, config_from_metadata


def _metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _shape_of(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], int]:
    meta = _metadata(path)
    try:
        return tuple(json.loads(meta["in_shape"])), int(meta["num_classes"])
    except (KeyError, ValueError) as exc:
        raise BnlabError(f"checkpoint {path}: broken bnlab metadata ({exc})") from None


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
    from bnlab.train import evaluate, load_checkpoint, save_checkpoint

    model, config = load_checkpoint(path)
    in_shape, num_classes = _shape_of(path)
    name = dataset or config.dataset
    data = load_dataset(name, data_dir, download=download)
    if tuple(data.in_shape) != tuple(in_shape):
        raise BnlabError(
            f"checkpoint {path} expects {tuple(in_shape)} images, {name} has {data.in_shape}"
        )
    x_train = data.train.tensors[0]
    batches = torch.split(x_train, batch_size)
    try:
        recalibrate_bn(model, batches, num_batches=num_batches, progress=progress)
    except ValueError as exc:
        raise BnlabError(f"cannot recalibrate {path}: {exc}") from None
    used = min(len(x_train), batch_size * (num_batches or len(batches)))
    target = Path(out) if out is not None else Path(path).with_suffix(".recalibrated.safetensors")
    before_model, _ = load_checkpoint(path)
    _, acc_before = evaluate(before_model, data.test)
    _, acc_after = evaluate(model, data.test)
    save_checkpoint(target, model, config, in_shape=in_shape, num_classes=num_classes)
    return (
        f"recalibrated BN statistics of {path} on {used} {name} training images; test "
        f"accuracy {100 * acc_before:.2f} % -> {100 * acc_after:.2f} %; wrote {target}"
    )


def fold_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Fold a checkpoint's BN layers (:func:`bnlab.nn.fold_bn`), save it, return a line."""
    from safetensors.torch import save_file

    from bnlab.nn import fold_bn
    from bnlab.train import load_checkpoint

    model, config = load_checkpoint(path)
    in_shape, num_classes = _shape_of(path)
    folded, report = fold_bn(model, report=True)
    x = torch.randn(8, *in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((folded(x) - model(x)).abs().max())
    state = {k: v.detach().cpu().contiguous() for k, v in folded.state_dict().items()}
    metadata = {
        "format": "bnlab-folded",
        "folded_from": str(path),
        "config": json.dumps(_config_dict(config)),
        "in_shape": json.dumps(list(in_shape)),
        "num_classes": str(num_classes),
    }
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
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


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)


def load_folded(path: str | os.PathLike[str]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild a model written by :func:`fold_checkpoint` (eval mode) and its config."""
    from safetensors.torch import load_file

    from bnlab.models import build_model
    from bnlab.nn import fold_bn

    try:
        meta = _metadata(path)
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a broken file
        raise BnlabError(f"{path}: not a safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != "bnlab-folded":
        raise BnlabError(f"{path}: not a folded checkpoint (write one with 'bnlab fold')")
    config, in_shape, num_classes = config_from_metadata(Path(path), meta)
    model = build_model(
        config.model, norm=config.norm, placement=config.placement,
        in_shape=in_shape,  # type: ignore[arg-type]
        num_classes=num_classes, norm_kwargs=dict(config.norm_kwargs),
        **dict(config.model_kwargs),
    )
    folded = fold_bn(model)
    try:
        folded.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BnlabError(f"{path}: tensors do not match the folded model ({exc})") from None
    return folded.eval(), config
