"""Training: one run of one model on one dataset, with metrics and a checkpoint.

``train(config, out_dir)`` trains ``config.model`` on ``config.dataset`` and writes the run
folder (``metrics.jsonl``, ``model.safetensors``, ``summary.json`` last). The package:

- :mod:`.config`: :class:`TrainConfig` (every field with its help text and value rule),
  its JSON round trip and :func:`validate_config`;
- :mod:`.builder`: :func:`build`, the one model builder from a config;
- :mod:`.checkpoint`: the checkpoint format, plain and folded (safetensors only);
- :mod:`.runfiles`: the one writer and reader of a run folder;
- :mod:`.ddp`: the process group, each rank's slice, the global-batch loss;
- :mod:`.loop`: the loop itself (prepare, step, record, finish) and :func:`evaluate`;
- :mod:`._cli`: the ``bnlab train`` / ``eval`` / ``models`` commands (flags generated from
  the config, and the text they print).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlab.train._cli import evaluate_checkpoint, format_summary
    from bnlab.train.builder import build, seed_everything
    from bnlab.train.checkpoint import (
        CHECKPOINT_FILE,
        config_from_metadata,
        load_checkpoint,
        load_folded,
        read_checkpoint_info,
        save_checkpoint,
    )
    from bnlab.train.config import (
        DEVICES,
        OPTIMIZERS,
        ConfigError,
        TrainConfig,
        validate_config,
    )
    from bnlab.train.ddp import slice_bounds
    from bnlab.train.loop import TrainResult, check_out_dir, evaluate, train
    from bnlab.train.runfiles import (
        METRICS_FILE,
        SUMMARY_FILE,
        RunFiles,
        read_run,
        write_run,
    )

# name -> submodule. The submodules load on the first use of a name here, so that importing
# ``bnlab.train.config`` (all the CLI's parser needs) does not import torch.
_HOMES = {
    "build": "builder", "seed_everything": "builder",
    "CHECKPOINT_FILE": "checkpoint", "config_from_metadata": "checkpoint",
    "load_checkpoint": "checkpoint", "load_folded": "checkpoint",
    "read_checkpoint_info": "checkpoint", "save_checkpoint": "checkpoint",
    "DEVICES": "config", "OPTIMIZERS": "config", "ConfigError": "config",
    "TrainConfig": "config", "validate_config": "config",
    "slice_bounds": "ddp",
    "TrainResult": "loop", "check_out_dir": "loop", "evaluate": "loop", "train": "loop",
    "METRICS_FILE": "runfiles", "SUMMARY_FILE": "runfiles", "RunFiles": "runfiles",
    "read_run": "runfiles", "write_run": "runfiles",
    "evaluate_checkpoint": "_cli", "format_summary": "_cli",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'bnlab.train' has no attribute {name!r}")
    from bnlab.train import _cli, builder, checkpoint, config, ddp, loop, runfiles

    modules = {"builder": builder, "checkpoint": checkpoint, "config": config, "ddp": ddp,
               "loop": loop, "runfiles": runfiles, "_cli": _cli}
    return getattr(modules[_HOMES[name]], name)


__all__ = [
    "CHECKPOINT_FILE",
    "DEVICES",
    "METRICS_FILE",
    "OPTIMIZERS",
    "SUMMARY_FILE",
    "ConfigError",
    "RunFiles",
    "TrainConfig",
    "TrainResult",
    "build",
    "check_out_dir",
    "config_from_metadata",
    "evaluate",
    "evaluate_checkpoint",
    "format_summary",
    "load_checkpoint",
    "load_folded",
    "read_checkpoint_info",
    "read_run",
    "save_checkpoint",
    "seed_everything",
    "slice_bounds",
    "train",
    "validate_config",
    "write_run",
]
