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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bnlab._io import append_jsonl, atomic_write_json, atomic_write_text, replace_on_success
from bnlab._lock import folder_lock
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
    evaluation, :meth:`save_model`, then :meth:`finish` (the summary, last); :meth:`abort`
    when the run fails.

    The folder is locked (:func:`bnlab._lock.folder_lock`: a second writer is refused,
    naming the holder's PID) from :meth:`start` to :meth:`finish`/:meth:`abort`. When it
    already holds a previous run's files, the new files are written into a staging folder
    inside it and replace the old ones only when :meth:`finish` has written the summary
    (:func:`bnlab._io.replace_on_success`): a failed or interrupted ``--overwrite`` keeps
    the previous run whole. A run into an empty folder writes in place, so an interrupted
    one leaves its ``metrics.jsonl`` so far (and no summary).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir)
        self._files = self.dir
        self._open: ExitStack | None = None

    def start(self) -> None:
        """Create and lock the folder; stage the new files if a previous run is there."""
        stack = ExitStack()
        try:
            stack.enter_context(folder_lock(self.dir, "bnlab train"))
            if any((self.dir / name).exists() for name in RUN_FILES):
                self._files = stack.enter_context(replace_on_success(self.dir, RUN_FILES))
        except BaseException:
            stack.close()
            raise
        self._open = stack

    def append(self, row: dict[str, Any]) -> None:
        append_jsonl(self._files / METRICS_FILE, row)

    def save_model(self, model: nn.Module, config: TrainConfig, in_shape: tuple[int, ...],
                   num_classes: int) -> str:
        """Write the checkpoint; returns its file name (for the summary)."""
        save_checkpoint(self._files / CHECKPOINT_FILE, model, config, in_shape=in_shape,
                        num_classes=num_classes)
        return CHECKPOINT_FILE

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the summary (last), put the new files in place, release the folder."""
        atomic_write_json(self._files / SUMMARY_FILE, summary)
        if self._open is not None:
            self._open.close()
        self._open, self._files = None, self.dir

    def abort(self, exc: BaseException) -> None:
        """The run failed with ``exc``: drop the staged files (a previous run stays as it
        was) and release the folder."""
        if self._open is not None:
            self._open.__exit__(type(exc), exc, exc.__traceback__)
        self._open, self._files = None, self.dir


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
