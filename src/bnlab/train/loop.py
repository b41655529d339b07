"""The training loop: prepare, step, record, finish.

Batches are drawn by indexing the in-memory tensors with a permutation from a seeded
``torch.Generator`` (no DataLoader workers), one new permutation per epoch; the last
incomplete batch of an epoch is dropped, so an epoch is ``N // batch_size`` steps. The
same seed and thread count give identical metrics on CPU.

A loss that becomes NaN or Inf stops the run with ``diverged: true``: a result, not an
error. Under torchrun only rank 0 evaluates and writes the run folder
(:mod:`.runfiles`); every rank returns the same :class:`TrainResult` (:mod:`.ddp`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bnlab import __version__
from bnlab._io import remove_stale_temps
from bnlab._lock import LOCK_FILE
from bnlab._progress import Progress
from bnlab.distributed import record_failure
from bnlab.errors import BnlabError
from bnlab.train import ddp
from bnlab.train.builder import build
from bnlab.train.config import ConfigError, TrainConfig, check_norm_options, validate_config
from bnlab.train.runfiles import RunWriter


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank: the summary (as written), the metrics
    rows, the model (eval mode) and this process's rank."""

    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    model: nn.Module
    rank: int = 0


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an ``out_dir`` that is a file, not writable, or non-empty (unless overwrite).

    Creates nothing; removes only the temporary files that dead bnlab processes left there.
    A folder holding only a lock file counts as empty.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ConfigError("out_dir", f"out_dir {out}: exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError("out_dir", f"out_dir {out}: directory is not writable")
        remove_stale_temps(out)  # what killed runs left (ours by name, their PID gone)
        if any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
            raise ConfigError(
                "out_dir", f"out_dir {out}: directory is not empty; pass overwrite=True "
                "(--overwrite) to replace a previous run, or choose another directory"
            )
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("out_dir", f"out_dir {out}: {parent} is a file, cannot create a "
                          "directory in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("out_dir", f"out_dir {out}: cannot create it, {parent} is not "
                          "writable")
    return out


def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    batch_size: int = 1000,
    *,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of ``model`` on ``dataset``.

    Runs in ``model.eval()`` under ``torch.no_grad()`` (running statistics, no update),
    then restores the model's previous train/eval mode. ``limit`` uses the first N items.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    n = len(x_all) if limit is None else min(limit, len(x_all))
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    loss_sum = 0.0
    correct = 0
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, n, batch_size):
                x = x_all[i:min(i + batch_size, n)].to(device)
                y = y_all[i:min(i + batch_size, n)].to(device)
                out = model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class _Run:
    """One run's inputs, model and progress (prepared by :func:`_prepare`)."""

    config: TrainConfig
    dist: ddp.DistInfo
    data: Any
    x_train: torch.Tensor
    y_train: torch.Tensor
    total_steps: int
    device: torch.device
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    writer: RunWriter | None
    t_start: float
    generator: torch.Generator = field(default_factory=torch.Generator)
    perm: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_loss: float | None = None
    diverged_at: int | None = None
    t_loop: float = field(default_factory=time.perf_counter)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x_train) // self.config.batch_size


def train(
    config: TrainConfig,
    out_dir: Path | str | None = None,
    *,
    progress: bool | None = None,
    overwrite: bool = False,
    data: Any = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; writes the run folder when ``out_dir``.

    ``data`` (a :class:`bnlab.data.DatasetSplits`) skips loading; otherwise the dataset
    is looked up in ``data_dir``, ``$BNLAB_DATA_DIR``, the cache, then downloaded unless
    ``download=False``. Bad config values, an unusable ``out_dir`` or missing data raise
    :class:`BnlabError` before anything is written.
    """
    t_start = time.perf_counter()
    validate_config(config)
    info = ddp.setup(config)
    threads = torch.get_num_threads()  # config.threads applies to this run only
    completed = False
    try:
        result = _run(config, info, out_dir, overwrite=overwrite, data=data,
                      data_dir=data_dir, download=download, progress=progress,
                      t_start=t_start)
        completed = True
        return result
    except BaseException as exc:
        if info.world > 1:
            record_failure(exc)  # before the group closes below, so before a peer can fail
        raise
    finally:
        torch.set_num_threads(threads)
        ddp.teardown(info, completed=completed)


def _run(config: TrainConfig, info: ddp.DistInfo, out_dir: Path | str | None, *,
         progress: bool | None, t_start: float, **load: Any) -> TrainResult:
    run = _prepare(config, info, out_dir, progress=progress, t_start=t_start, **load)
    if run.writer is not None:
        run.writer.start()
    try:
        return _loop(run, progress)
    except BaseException as exc:
        if run.writer is not None:
            run.writer.abort(exc)
        raise


def _loop(run: _Run, progress: bool | None) -> TrainResult:
    config, info = run.config, run.dist
    desc = f"train {config.model}/{config.norm} lr={config.lr:g}"
    with Progress(run.total_steps, desc, enabled=progress if info.is_main else False,
                  unit="step") as bar:
        run.net.train()
        while run.step < run.total_steps:
            loss = _step(run)
            if run.diverged_at is not None:
                break
            bar.update()
            if info.is_main and (run.step % config.eval_every == 0
                                 or run.step == run.total_steps):
                row = _record(run)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{row['test_acc']:.4f}")
    return _finish(run)


def _prepare(config: TrainConfig, info: ddp.DistInfo, out_dir: Path | str | None, *,
             progress: bool | None, overwrite: bool, data: Any,
             data_dir: str | os.PathLike[str] | None, download: bool, t_start: float) -> _Run:
    """Check the folder, load the data, build the model and its optimizer, open the files."""
    from bnlab.data import load_dataset

    # Every rank checks (read-only), so a bad out_dir stops them all before any collective;
    # rank 0 creates the folder only after DDP's first broadcast, once all have checked.
    out = check_out_dir(out_dir, overwrite) if out_dir is not None else None
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if data is None:
        data = load_dataset(config.dataset, data_dir, download=download,
                            progress=progress if info.is_main else False)
    elif data.name != config.dataset:
        raise BnlabError(f"data is {data.name!r} but config.dataset is {config.dataset!r}")
    x_train, y_train = data.train.tensors
    if config.train_subset is not None:
        x_train, y_train = x_train[:config.train_subset], y_train[:config.train_subset]
    n_train, batch = len(x_train), config.batch_size
    if batch > n_train:
        raise BnlabError(f"batch_size {batch} is larger than the training set ({n_train})")
    if info.world > 1 and not config.sync_bn and batch // info.world < 2 \
            and check_norm_options(config.norm, config.norm_kwargs):
        raise ConfigError("batch_size", f"batch_size {batch} over {info.world} processes "
                          f"leaves a rank fewer than 2 samples, too few for norm "
                          f"{config.norm!r}'s batch statistics; use a larger batch or "
                          "sync_bn (--sync-bn)")
    total = (config.steps if config.steps is not None
             else max(1, math.ceil(float(config.epochs or 0) * (n_train // batch))))
    device = ddp.device_for(config, info)
    model, net = ddp.wrap(build(config, data.in_shape, data.num_classes, device=device),
                          config, info, device)
    writer = RunWriter(out) if out is not None and info.is_main else None
    return _Run(config=config, dist=info, data=data, x_train=x_train, y_train=y_train,
                total_steps=total, device=device, model=model, net=net,
                optimizer=optimizer_for(config, net), writer=writer,
                t_start=t_start, generator=torch.Generator().manual_seed(config.seed))


def optimizer_for(config: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer over ``net``'s parameters (with ``decay_weights_only``, in the
    groups of :func:`weight_groups`)."""
    return _make_optimizer(config, weight_groups(net) if config.decay_weights_only
                           else net.parameters())


def _make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (parameters, or groups from :func:`weight_groups`)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def weight_groups(net: nn.Module) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the conv/linear weights (decayed with the optimizer's
    ``weight_decay``), then every other parameter (biases, norm scales and shifts) with
    ``weight_decay`` 0; each parameter once, in ``net.parameters()`` order."""
    weights = {id(m.weight) for m in net.modules()
               if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
               and isinstance(m.weight, nn.Parameter)}
    params = list(net.parameters())
    return [{"params": [p for p in params if id(p) in weights]},
            {"params": [p for p in params if id(p) not in weights], "weight_decay": 0.0}]


def _step(run: _Run) -> float:
    """One optimizer step on the next batch; returns the global batch's mean loss.

    A NaN/Inf loss stops before the update: ``steps`` counts the updates done,
    ``diverged_at`` is the step whose loss was not finite.
    """
    batch = run.config.batch_size
    pos = run.step % run.steps_per_epoch
    if pos == 0:
        run.perm = torch.randperm(len(run.x_train), generator=run.generator)
    lo, hi = ddp.slice_bounds(batch, run.dist.world, run.dist.rank)
    idx = run.perm[pos * batch + lo:pos * batch + hi]
    x, y = run.x_train[idx].to(run.device), run.y_train[idx].to(run.device)
    loss, step_loss = ddp.batch_loss(run.net(x), y, run.dist, batch)
    run.loss_sum += step_loss
    run.loss_count += 1
    if not math.isfinite(step_loss):
        run.diverged_at = run.step + 1
        return step_loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.step += 1
    run.last_loss = step_loss
    return step_loss


def _record(run: _Run) -> dict[str, Any]:
    """Evaluate, append one metrics row (to the list and the file), reset the loss mean."""
    config, data = run.config, run.data
    mean_loss = run.loss_sum / run.loss_count if run.loss_count else run.last_loss
    test_loss, test_acc = evaluate(run.model, data.test, config.eval_batch_size,
                                   limit=config.eval_subset, device=run.device)
    row: dict[str, Any] = {
        "step": run.step,
        "epoch": run.step * config.batch_size / len(run.x_train),
        "train_loss": _finite_or_none(mean_loss),
        "test_loss": _finite_or_none(test_loss),
        "test_acc": test_acc,
        "test_n": min(config.eval_subset or len(data.test), len(data.test)),
        "lr": run.optimizer.param_groups[0]["lr"],
        "wall_time_s": time.perf_counter() - run.t_loop,
    }
    if config.eval_train:
        tr_loss, tr_acc = evaluate(run.model, TensorDataset(run.x_train, run.y_train),
                                   config.eval_batch_size, device=run.device)
        row["train_acc"] = tr_acc
        row["train_eval_loss"] = _finite_or_none(tr_loss)
    run.loss_sum, run.loss_count = 0.0, 0
    run.metrics.append(row)
    if run.writer is not None:
        run.writer.append(row)
    return row


def _finish(run: _Run) -> TrainResult:
    """Rank 0: the last evaluation, the summary, the checkpoint and summary.json (last);
    every rank then receives rank 0's summary and metrics."""
    summary: dict[str, Any] = {}
    if run.dist.is_main:
        summary = _summary(run, time.perf_counter() - run.t_loop)
        if run.writer is not None:
            summary["checkpoint"] = run.writer.save_model(
                run.model, run.config, run.data.in_shape, run.data.num_classes)
            summary["wall_time_s"] = time.perf_counter() - run.t_start
            run.writer.finish(summary)
    summary, metrics = ddp.share((summary, run.metrics), run.dist)
    run.model.eval()
    return TrainResult(summary=summary, metrics=metrics, model=run.model, rank=run.dist.rank)


def _summary(run: _Run, train_time: float) -> dict[str, Any]:
    from bnlab.models import count_params

    config, step = run.config, run.step
    diverged = run.diverged_at is not None
    needs_row = diverged or not run.metrics or run.metrics[-1]["step"] != step
    final = _record(run) if needs_row else run.metrics[-1]
    summary: dict[str, Any] = {
        "test_acc": final["test_acc"],
        "test_loss": final["test_loss"],
        "test_n": final["test_n"],
        "train_loss": final["train_loss"],
        "best_test_acc": max(r["test_acc"] for r in run.metrics),
        "steps": step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "epochs_done": step * config.batch_size / len(run.x_train),
        "diverged": diverged,
        "diverged_at_step": run.diverged_at,
        "wall_time_s": time.perf_counter() - run.t_start,
        "train_time_s": train_time,
        "step_time_ms": 1000.0 * train_time / max(step, 1),
        "params": count_params(run.model),
        "dataset": run.data.name,
        "dataset_source": run.data.source,
        "n_train": len(run.x_train),
        "global_batch_size": config.batch_size,
        "world_size": run.dist.world,
        "threads": torch.get_num_threads(),
        "bnlab_version": __version__,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
    }
    if config.eval_train:
        summary["train_acc"] = final["train_acc"]
        summary["train_eval_loss"] = final["train_eval_loss"]
    return summary
