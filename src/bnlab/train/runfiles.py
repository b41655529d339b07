"""The run folder: the one writer and the one reader of a run's files.

A run folder holds

- ``metrics.jsonl``: one JSON object per evaluation (step, epoch, train_loss, test_loss,
  test_acc, test_n, lr, wall_time_s; plus train_acc and train_eval_loss with
  ``eval_train``; the lab's custom runs add their own keys). Accuracies are fractions in
  [0, 1]; a non-finite loss is ``null``.
- ``model.safetensors`` (runs of ``bnlab train``): the checkpoint (:mod:`.checkpoint`).
- ``summary.json``, written last and atomically: its presence means the run is complete.

``bnlab train`` and the demo write through :class:`RunWriter` (the metrics grow as the run
goes), the lab through :func:`write_run` (all at once); everything reads through
:func:`read_run`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bnlab._io import append_jsonl, atomic_write_json, atomic_write_text
from bnlab.errors import BnlabError
from bnlab.train.checkpoint import CHECKPOINT_FILE, save_checkpoint
from bnlab.train.config import TrainConfig

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILES = (SUMMARY_FILE, METRICS_FILE, CHECKPOINT_FILE)


class RunFileError(BnlabError):
    """A run folder whose files cannot be read back (``path``: the broken file)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class RunFiles:
    """A complete run as read back from its folder."""

    dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def checkpoint(self) -> Path | None:
        path = self.dir / CHECKPOINT_FILE
        return path if path.is_file() else None


class RunWriter:
    """Writes one run's folder as the run goes: :meth:`start`, :meth:`append` per
    evaluation, :meth:`save_model`, then :meth:`finish` (the summary, last)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir)

    def start(self) -> None:
        """Create the folder; remove a previous run's files (only ours, by name)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            (self.dir / name).unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        append_jsonl(self.dir / METRICS_FILE, row)

    def save_model(self, model: nn.Module, config: TrainConfig, in_shape: tuple[int, ...],
                   num_classes: int) -> str:
        """Write the checkpoint; returns its file name (for the summary)."""
        save_checkpoint(self.dir / CHECKPOINT_FILE, model, config, in_shape=in_shape,
                        num_classes=num_classes)
        return CHECKPOINT_FILE

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.dir / SUMMARY_FILE, summary)


def write_run(run_dir: str | os.PathLike[str], metrics: Sequence[dict[str, Any]],
              summary: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write a finished run's ``metrics.jsonl``, then ``summary.json`` (with ``extra``) last."""
    folder = Path(run_dir)
    text = "".join(json.dumps(m, allow_nan=True) + "\n" for m in metrics)
    atomic_write_text(folder / METRICS_FILE, text)
    atomic_write_json(folder / SUMMARY_FILE, {**summary, **(extra or {})})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(path, f"not valid JSON ({exc})") from None


def read_run(run_dir: str | os.PathLike[str]) -> RunFiles | None:
    """The complete run in ``run_dir``; ``None`` if it has no summary yet (not complete);
    :class:`RunFileError` naming the file when one is broken."""
    folder = Path(run_dir)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    summary = _read_json(summary_path)
    if not isinstance(summary, dict) or "test_acc" not in summary:
        raise RunFileError(summary_path, "not a run summary (no test_acc)")
    metrics_path = folder / METRICS_FILE
    metrics = []
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(metrics_path, f"cannot be read ({exc})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunFileError(metrics_path, f"line {i + 1} is not valid JSON") from None
        if not isinstance(row, dict):
            raise RunFileError(metrics_path, f"line {i + 1} is not a JSON object")
        metrics.append(row)
    return RunFiles(folder, summary, metrics)


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the checkpoint inside it when it is a run folder."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p
