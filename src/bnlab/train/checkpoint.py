"""bnlab's checkpoint format, plain and folded: the one place that writes and reads it.

A checkpoint is a safetensors file (never a pickle) of a model's state dict with string
metadata:

- ``format``: ``"bnlab"`` (written by ``bnlab train`` / ``recalibrate``) or
  ``"bnlab-folded"`` (``bnlab fold``: BN folded into the preceding layers);
- ``bnlab_version``; ``config``: the :class:`TrainConfig` as JSON; ``in_shape`` (JSON
  list) and ``num_classes``: the input the model was built for;
- folded files also ``folded_from``: the path of the checkpoint they were folded from.

Reading trusts nothing in the file: the metadata is parsed and validated against the
config schema (:func:`bnlab.train.config.validate_config`, including the memory estimate)
and ``in_shape``/``num_classes`` must be the dataset's; then every tensor's name, shape and
dtype in the header must be exactly those of the model the metadata describes (built on
the ``meta`` device, so nothing is allocated), all before the model is built and before a
tensor is read. A folded model is rebuilt as ``fold_bn(build(config))``: its structure is a
function of the architecture alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab import __version__
from bnlab._io import atomic_path
from bnlab.errors import BnlabError
from bnlab.train.builder import build, dataset_shape, state_shapes
from bnlab.train.config import ConfigError, TrainConfig, validate_config

PLAIN = "bnlab"
FOLDED = "bnlab-folded"
FORMATS = (PLAIN, FOLDED)
CHECKPOINT_FILE = "model.safetensors"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says, validated: its format, config and input."""

    path: Path
    format: str
    config: TrainConfig
    in_shape: tuple[int, ...]
    num_classes: int
    metadata: dict[str, str]


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, config: TrainConfig,
                    *, in_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None, format: str = PLAIN,
                    folded_from: str | os.PathLike[str] | None = None) -> None:
    """Write ``model``'s state dict as safetensors (atomically), the config in the metadata.

    ``format=FOLDED`` (with ``folded_from``) marks a model folded by :func:`bnlab.nn.fold_bn`.
    """
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if in_shape is None or num_classes is None:
        in_shape, num_classes = dataset_shape(config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": format, "bnlab_version": __version__, "config": config.to_json(),
                "in_shape": json.dumps(list(in_shape)), "num_classes": str(num_classes)}
    if format == FOLDED:
        metadata["folded_from"] = str(folded_from)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def config_from_metadata(
    path: Path, metadata: dict[str, str]
) -> tuple[TrainConfig, tuple[int, ...], int]:
    """(config, in_shape, num_classes) from a bnlab safetensors header, validated against
    the config schema before anything is built; a :class:`BnlabError` otherwise."""
    try:
        config = TrainConfig.from_json(metadata["config"])
        in_shape = json.loads(metadata["in_shape"])
        num_classes = json.loads(metadata["num_classes"])
        validate_config(config, runnable=False)
    except ConfigError as exc:
        raise BnlabError(f"checkpoint {path}: its config is invalid: {exc}") from None
    except KeyError as exc:
        raise BnlabError(f"checkpoint {path}: broken bnlab metadata (no {exc})") from None
    except (ValueError, TypeError) as exc:
        raise BnlabError(f"checkpoint {path}: broken bnlab metadata ({exc})") from None
    shape, classes = dataset_shape(config)
    if not isinstance(in_shape, list) or tuple(in_shape) != shape:
        raise BnlabError(f"checkpoint {path}: in_shape {in_shape!r} is not {config.dataset}'s "
                         f"{list(shape)}")
    if num_classes != classes or isinstance(num_classes, bool):
        raise BnlabError(f"checkpoint {path}: num_classes {num_classes!r} is not "
                         f"{config.dataset}'s {classes}")
    return config, shape, classes


def read_checkpoint_info(path: str | os.PathLike[str],
                         formats: tuple[str, ...] = (PLAIN,)) -> CheckpointInfo:
    """The validated header of a bnlab checkpoint of one of ``formats`` (reads no tensor)."""
    p = Path(path)
    if not p.is_file():
        raise BnlabError(f"checkpoint {p}: file not found")
    metadata, _ = _read_header(p)
    fmt = metadata.get("format")
    if fmt not in formats:
        if fmt == FOLDED:
            raise BnlabError(f"checkpoint {p}: a folded model (written by 'bnlab fold'); load "
                             "it with bnlab.toolkit.load_folded")
        if FOLDED in formats:
            raise BnlabError(f"{p}: not a folded checkpoint (write one with 'bnlab fold')")
        raise BnlabError(f"checkpoint {p}: no bnlab metadata; expected a {CHECKPOINT_FILE} "
                         "written by 'bnlab train'")
    config, in_shape, num_classes = config_from_metadata(p, metadata)
    return CheckpointInfo(p, str(fmt), config, in_shape, num_classes, metadata)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from the config in a bnlab checkpoint and load its weights.

    Reads safetensors only (never unpickles). Anything that is not a bnlab checkpoint, or
    whose tensors do not match the model, raises :class:`BnlabError`. Eval mode.
    """
    info = read_checkpoint_info(path)
    _check_tensors(info, state_shapes(info.config, info.in_shape, info.num_classes))
    model = build(info.config, info.in_shape, info.num_classes, seeded=False)
    _load_into(info, model)
    return model.eval(), info.config


def load_folded(path: str | os.PathLike[str]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild a model written by ``bnlab fold`` (eval mode) and its config."""
    from bnlab.nn import fold_bn

    info = read_checkpoint_info(path, formats=(FOLDED,))
    meta = fold_bn(build(info.config, info.in_shape, info.num_classes, device="meta"))
    _check_tensors(info, {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()})
    folded = fold_bn(build(info.config, info.in_shape, info.num_classes, seeded=False))
    _load_into(info, folded)
    return folded.eval(), info.config


def _read_header(p: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {name: (shape, dtype name)}) from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype())
                       for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several types for a broken header
        raise BnlabError(
            f"checkpoint {p}: not a safetensors file ({type(exc).__name__}: {exc}); "
            f"expected a {CHECKPOINT_FILE} written by 'bnlab train'"
        ) from None
    return metadata, tensors


_DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.uint8: "U8", torch.bool: "BOOL"}


def _check_tensors(info: CheckpointInfo, expected: dict[str, tuple[tuple[int, ...], Any]]
                   ) -> None:
    """Every tensor the model needs is in the header with its shape and dtype; no other."""
    _, found = _read_header(info.path)
    what = f"model {info.config.model!r} (norm={info.config.norm!r})"
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise BnlabError(
            f"checkpoint {info.path}: its tensors do not match {what}: "
            + "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                    f"unexpected {extra[:3]}" if extra else "") if x))
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = found[name]
        want_dtype = _DTYPE_NAMES.get(dtype, str(dtype))
        if got_shape != shape or got_dtype != want_dtype:
            raise BnlabError(
                f"checkpoint {info.path}: its tensors do not match {what}: {name} is "
                f"{got_dtype} {list(got_shape)}, expected {want_dtype} {list(shape)}")


def _load_into(info: CheckpointInfo, model: nn.Module) -> None:
    from safetensors import safe_open

    with safe_open(str(info.path), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    model.load_state_dict(state, strict=True)
