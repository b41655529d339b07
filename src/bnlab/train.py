"""The training loop: one run of one model on one dataset, with metrics and a checkpoint.

``train(config, out_dir)`` writes, when ``out_dir`` is given:

- ``metrics.jsonl``: one JSON object per evaluation (step, epoch, train_loss, test_loss,
  test_acc, test_n, lr, wall_time_s; plus train_acc and train_eval_loss with
  ``eval_train``). Accuracies are fractions in [0, 1]; a non-finite loss is ``null``.
- ``model.safetensors``: the state dict, with the config (JSON) in the metadata.
- ``summary.json`` last, atomically: its presence means the run is complete.

Batches are drawn by indexing the in-memory tensors with a permutation from a seeded
``torch.Generator`` (no DataLoader workers), one new permutation per epoch; the last
incomplete batch of an epoch is dropped, so an epoch is ``N // batch_size`` steps. The
same seed and thread count give identical metrics on CPU.

A loss that becomes NaN or Inf stops the run with ``diverged: true``: a result, not an
error.

Distributed: under torchrun (``WORLD_SIZE`` > 1) the process group is initialised here
(gloo on CPU, nccl on CUDA). ``batch_size`` is the *global* batch: every rank draws the
same permutation and takes its contiguous ``np.array_split``-style slice of each global
batch, so the ranks together see exactly the samples one process would. Each rank's
loss is the *sum* over its slice times ``W / global_n`` (= its mean times
``local_n · W / global_n``), so DDP's gradient average is the global-batch mean gradient
even for uneven slices. Only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bnlab import __version__
from bnlab._io import append_jsonl, atomic_path, atomic_write_json, remove_stale_temps
from bnlab._progress import Progress
from bnlab.distributed import record_failure
from bnlab.errors import BnlabError

OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "model.safetensors"
_OUR_FILES = (SUMMARY_FILE, METRICS_FILE, CHECKPOINT_FILE)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Logged in full with every result.

    Exactly one of ``steps`` / ``epochs`` is set (``steps`` wins if both are given by a
    caller that means it; the CLI refuses both). ``model_kwargs`` go to the model builder
    (``depth``, ``width``, ``dropout`` …), ``norm_kwargs`` to every norm layer
    (``momentum``, ``virtual_batch_size`` …). ``init_scale`` multiplies every conv/linear
    weight after the default init (the init-sensitivity claim). ``train_subset`` keeps
    the first N training images (deterministic). ``eval_train`` also reports accuracy and
    loss on the (subset of the) training split at each evaluation. ``eval_subset``
    evaluates on the first N test images only (faster; ``test_n`` says how many).
    ``dist_timeout_s`` is the process-group timeout under torchrun; ``device`` is
    ``"cpu"`` or ``"cuda"``.
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
    eval_subset: int | None = None
    dist_timeout_s: float = 120.0
    device: str = "cpu"


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary (as written), the metrics rows, the model."""

    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    model: nn.Module


# --------------------------------------------------------------------------- validation


def _finite_positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`BnlabError` naming the first bad value and what was expected."""
    from bnlab.data import check_dataset_name
    from bnlab.models import build_model, check_model_name
    from bnlab.models.layers import check_placement
    from bnlab.models.norms import norm_spec

    check_model_name(config.model)
    norm_spec(config.norm)
    check_placement(config.placement)
    check_dataset_name(config.dataset)
    if config.optimizer not in OPTIMIZERS:
        raise BnlabError(
            f"unknown optimizer {config.optimizer!r}; expected one of: {', '.join(OPTIMIZERS)}"
        )
    if config.device not in DEVICES:
        raise BnlabError(f"unknown device {config.device!r}; expected one of: cpu, cuda")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BnlabError("device 'cuda' asked for, but torch sees no CUDA device")
    if config.steps is None and config.epochs is None:
        raise BnlabError("set steps or epochs (both are None)")
    if config.steps is not None and not (isinstance(config.steps, int) and config.steps > 0):
        raise BnlabError(f"steps must be a positive whole number, got {config.steps!r}")
    if config.steps is None and not _finite_positive(config.epochs):
        raise BnlabError(f"epochs must be a positive number, got {config.epochs!r}")
    for name in ("batch_size", "eval_batch_size", "eval_every"):
        value = getattr(config, name)
        if not (isinstance(value, int) and value > 0):
            raise BnlabError(f"{name} must be a positive whole number, got {value!r}")
    for name in ("threads", "train_subset", "eval_subset"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise BnlabError(f"{name} must be a positive whole number or None, got {value!r}")
    for name in ("lr", "init_scale", "dist_timeout_s"):
        if not _finite_positive(getattr(config, name)):
            raise BnlabError(f"{name} must be a positive finite number, "
                             f"got {getattr(config, name)!r}")
    for name in ("momentum", "weight_decay"):
        value = getattr(config, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise BnlabError(f"{name} must be a finite number >= 0, got {value!r}")
    # Builds a throwaway model to check the model/norm kwargs (cheap: no data involved).
    from bnlab.data import DATASET_INFO

    in_shape, num_classes = DATASET_INFO[config.dataset]
    probe = build_model(config.model, norm=config.norm, placement=config.placement,
                        in_shape=in_shape, num_classes=num_classes,
                        norm_kwargs=dict(config.norm_kwargs), **dict(config.model_kwargs))
    # torch's norm layers accept any option value and only fail in forward (eps=-1,
    # momentum="abc"): one training-mode forward of two blank images finds that now, as a
    # clear error, instead of a traceback at the first step. It runs before the seeding.
    try:
        with torch.no_grad():
            probe.train()(torch.zeros(2, *in_shape))
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnlabError(
            f"model {config.model!r} with norm {config.norm!r} and norm options "
            f"{dict(config.norm_kwargs)} cannot run: {first}"
        ) from None


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an ``out_dir`` that is a file, not writable, or non-empty (unless overwrite).

    Creates nothing; removes only the temporary files that dead bnlab processes left there.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise BnlabError(f"--out {out}: exists and is not a directory")
        remove_stale_temps(out)  # what killed runs left (ours by name, their PID gone)
        if not os.access(out, os.W_OK | os.X_OK):
            raise BnlabError(f"--out {out}: directory is not writable")
        if any(out.iterdir()) and not overwrite:
            raise BnlabError(
                f"--out {out}: directory is not empty; pass --overwrite (overwrite=True) "
                "to replace a previous run, or choose another directory"
            )
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BnlabError(f"--out {out}: {parent} is a file, cannot create a directory in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BnlabError(f"--out {out}: cannot create it, {parent} is not writable")
    return out


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, config: TrainConfig,
                    *, in_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None) -> None:
    """Write ``model``'s state dict as safetensors (atomically), the config in the metadata."""
    from safetensors.torch import save_file

    from bnlab.data import DATASET_INFO

    if in_shape is None or num_classes is None:
        in_shape, num_classes = DATASET_INFO[config.dataset]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "bnlab",
        "bnlab_version": __version__,
        "config": json.dumps(dataclasses.asdict(config)),
        "in_shape": json.dumps(list(in_shape)),
        "num_classes": str(num_classes),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def config_from_metadata(
    path: Path, metadata: dict[str, str]
) -> tuple[TrainConfig, tuple[int, ...], int]:
    """(config, in_shape, num_classes) from a bnlab safetensors header, or a BnlabError."""
    try:
        raw = json.loads(metadata["config"])
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BnlabError(f"checkpoint {path}: unknown config fields {unknown}")
        config = TrainConfig(**raw)
        in_shape = tuple(int(s) for s in json.loads(metadata["in_shape"]))
        num_classes = int(metadata["num_classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BnlabError(f"checkpoint {path}: broken bnlab metadata ({exc})") from None
    return config, in_shape, num_classes


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from the config in a bnlab checkpoint and load its weights.

    Reads safetensors only (never unpickles). Anything that is not a bnlab checkpoint, or
    whose tensors do not match the model, raises :class:`BnlabError`.
    """
    from safetensors import safe_open

    from bnlab.models import build_model

    p = Path(path)
    if not p.is_file():
        raise BnlabError(f"checkpoint {p}: file not found")
    try:
        with safe_open(str(p), framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several types for a broken header
        raise BnlabError(
            f"checkpoint {p}: not a safetensors file ({type(exc).__name__}: {exc}); "
            f"expected a {CHECKPOINT_FILE} written by 'bnlab train'"
        ) from None
    if metadata.get("format") != "bnlab" or "config" not in metadata:
        raise BnlabError(f"checkpoint {p}: no bnlab metadata; expected a {CHECKPOINT_FILE} "
                         "written by 'bnlab train'")
    config, in_shape, num_classes = config_from_metadata(p, metadata)
    model = build_model(config.model, norm=config.norm, placement=config.placement,
                        in_shape=in_shape, num_classes=num_classes,  # type: ignore[arg-type]
                        norm_kwargs=dict(config.norm_kwargs), **dict(config.model_kwargs))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise BnlabError(
            f"checkpoint {p}: its tensors do not match model {config.model!r} "
            f"(norm={config.norm!r}): {' '.join(first[:3])}"
        ) from None
    model.eval()
    return model, config


# --------------------------------------------------------------------------- the loop


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False


def _setup_distributed(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = "nccl" if config.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.dist_timeout_s))
        owns = True
    return _Dist(world=dist.get_world_size(), rank=dist.get_rank(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)


def _slice_bounds(global_n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of a global batch, as ``np.array_split`` cuts it."""
    base, extra = divmod(global_n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    # The global NumPy RNG too, for model or norm code that draws from it.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


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
    """Train ``config.model`` on ``config.dataset``; see the module docstring for the files.

    ``data`` (a :class:`bnlab.data.DatasetSplits`) skips loading; otherwise the dataset
    is looked up in ``data_dir``, ``$BNLAB_DATA_DIR``, the cache, then downloaded unless
    ``download=False``. Bad config values, an unusable ``out_dir`` or missing data raise
    :class:`BnlabError` before anything is written.
    """
    t_start = time.perf_counter()
    validate_config(config)
    dist_info = _setup_distributed(config)
    threads = torch.get_num_threads()  # config.threads applies to this run only
    try:
        return _train(config, out_dir, progress=progress, overwrite=overwrite, data=data,
                      data_dir=data_dir, download=download, dist_info=dist_info,
                      t_start=t_start)
    except BaseException as exc:
        if dist_info.world > 1:
            record_failure(exc)  # before the group closes below, so before a peer can fail
        raise
    finally:
        torch.set_num_threads(threads)
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    out_dir: Path | str | None,
    *,
    progress: bool | None,
    overwrite: bool,
    data: Any,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
    dist_info: _Dist,
    t_start: float,
) -> TrainResult:
    from bnlab.data import load_dataset
    from bnlab.models import build_model, count_params, scale_init

    is_main = dist_info.rank == 0
    # Every rank checks (read-only), so a bad --out stops them all before any collective;
    # rank 0 creates the folder only after DDP's first broadcast, once all have checked.
    checked = check_out_dir(out_dir, overwrite) if out_dir is not None else None
    out = checked if is_main else None
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if data is None:
        data = load_dataset(config.dataset, data_dir, download=download,
                            progress=progress if is_main else False)
    elif data.name != config.dataset:
        raise BnlabError(f"data is {data.name!r} but config.dataset is {config.dataset!r}")
    x_train, y_train = data.train.tensors
    if config.train_subset is not None:
        x_train, y_train = x_train[:config.train_subset], y_train[:config.train_subset]
    n_train = len(x_train)
    batch = config.batch_size
    if batch > n_train:
        raise BnlabError(f"batch_size {batch} is larger than the training set ({n_train})")
    steps_per_epoch = n_train // batch
    total_steps = (config.steps if config.steps is not None
                   else max(1, math.ceil(float(config.epochs or 0) * steps_per_epoch)))

    device = torch.device("cpu")
    if config.device == "cuda":
        device = torch.device("cuda", dist_info.local_rank if dist_info.world > 1 else 0)

    _seed_everything(config.seed)
    model = build_model(config.model, norm=config.norm, placement=config.placement,
                        in_shape=data.in_shape, num_classes=data.num_classes,
                        norm_kwargs=dict(config.norm_kwargs), **dict(config.model_kwargs))
    scale_init(model, config.init_scale)
    model.to(device)
    net: nn.Module = model
    if dist_info.world > 1:
        if config.sync_bn:
            # Imported by name at run time: bnlab.nn (the sync issue) provides it.
            bnlab_nn = importlib.import_module("bnlab.nn")
            model = bnlab_nn.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _make_optimizer(config, net.parameters())
    generator = torch.Generator().manual_seed(config.seed)

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in _OUR_FILES:  # only with overwrite can these exist
            (out / name).unlink(missing_ok=True)

    metrics: list[dict[str, Any]] = []
    diverged = False
    diverged_at: int | None = None
    loss_sum, loss_count = 0.0, 0
    last_train_loss: float | None = None
    perm = torch.empty(0, dtype=torch.long)
    lo, hi = _slice_bounds(batch, dist_info.world, dist_info.rank)
    t_loop = time.perf_counter()
    step = 0

    def record(step: int) -> dict[str, Any]:
        nonlocal loss_sum, loss_count
        mean_loss = loss_sum / loss_count if loss_count else last_train_loss
        test_loss, test_acc = evaluate(model, data.test, config.eval_batch_size,
                                       limit=config.eval_subset, device=device)
        row: dict[str, Any] = {
            "step": step,
            "epoch": step * batch / n_train,
            "train_loss": _finite_or_none(mean_loss),
            "test_loss": _finite_or_none(test_loss),
            "test_acc": test_acc,
            "test_n": min(config.eval_subset or len(data.test), len(data.test)),
            "lr": optimizer.param_groups[0]["lr"],
            "wall_time_s": time.perf_counter() - t_loop,
        }
        if config.eval_train:
            tr_loss, tr_acc = evaluate(model, TensorDataset(x_train, y_train),
                                       config.eval_batch_size, device=device)
            row["train_acc"] = tr_acc
            row["train_eval_loss"] = _finite_or_none(tr_loss)
        loss_sum, loss_count = 0.0, 0
        metrics.append(row)
        if out is not None:
            append_jsonl(out / METRICS_FILE, row)
        return row

    desc = f"train {config.model}/{config.norm} lr={config.lr:g}"
    with Progress(total_steps, desc, enabled=progress if is_main else False,
                  unit="step") as bar:
        net.train()
        while step < total_steps:
            pos = step % steps_per_epoch
            if pos == 0:
                perm = torch.randperm(n_train, generator=generator)
            idx = perm[pos * batch + lo:pos * batch + hi]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            out_logits = net(x)
            if dist_info.world > 1:
                loss = F.cross_entropy(out_logits, y, reduction="sum") * (dist_info.world
                                                                            / batch)
                local_sum = F.cross_entropy(out_logits.detach(), y, reduction="sum")
                import torch.distributed as dist

                dist.all_reduce(local_sum)
                step_loss = float(local_sum) / batch
            else:
                loss = F.cross_entropy(out_logits, y)
                step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                # Stop before the update: `steps` counts the updates done, the
                # diverged_at_step is the one whose loss was NaN/Inf.
                diverged, diverged_at = True, step + 1
                loss_sum, loss_count = loss_sum + step_loss, loss_count + 1
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += step_loss
            loss_count += 1
            last_train_loss = step_loss
            bar.update()
            if is_main and (step % config.eval_every == 0 or step == total_steps):
                row = record(step)
                bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{row['test_acc']:.4f}")
    train_time = time.perf_counter() - t_loop
    if not is_main:
        return TrainResult(summary={"rank": dist_info.rank, "diverged": diverged,
                                    "steps": step}, metrics=[], model=model)
    if diverged:
        final = record(step)
    elif metrics and metrics[-1]["step"] == step:
        final = metrics[-1]
    else:  # pragma: no cover - the loop always records its last step
        final = record(step)
    summary: dict[str, Any] = {
        "test_acc": final["test_acc"],
        "test_loss": final["test_loss"],
        "test_n": final["test_n"],
        "train_loss": final["train_loss"],
        "best_test_acc": max(r["test_acc"] for r in metrics),
        "steps": step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs_done": step * batch / n_train,
        "diverged": diverged,
        "diverged_at_step": diverged_at,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "step_time_ms": 1000.0 * train_time / max(step, 1),
        "params": count_params(model),
        "dataset": data.name,
        "dataset_source": data.source,
        "n_train": n_train,
        "global_batch_size": batch,
        "world_size": dist_info.world,
        "threads": torch.get_num_threads(),
        "bnlab_version": __version__,
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(config),
    }
    if config.eval_train:
        summary["train_acc"] = final["train_acc"]
        summary["train_eval_loss"] = final["train_eval_loss"]
    if out is not None:
        save_checkpoint(out / CHECKPOINT_FILE, model, config, in_shape=data.in_shape,
                        num_classes=data.num_classes)
        summary["checkpoint"] = CHECKPOINT_FILE
        summary["wall_time_s"] = time.perf_counter() - t_start
        atomic_write_json(out / SUMMARY_FILE, summary)
    model.eval()
    return TrainResult(summary=summary, metrics=metrics, model=model)


# --------------------------------------------------------------------------- CLI helpers


def format_summary(summary: dict[str, Any], out_dir: str | os.PathLike[str] | None) -> str:
    """The lines ``bnlab train`` prints at the end of a run."""
    cfg = summary["config"]
    status = (f"DIVERGED at step {summary['diverged_at_step']} (loss NaN/Inf)"
              if summary["diverged"] else "completed")
    lines = [
        f"{cfg['model']} norm={cfg['norm']} on {summary['dataset']} "
        f"({summary['dataset_source']}): {status}",
        f"  steps {summary['steps']} ({summary['epochs_done']:.2f} epochs), global batch "
        f"{summary['global_batch_size']}, world size {summary['world_size']}, "
        f"threads {summary['threads']}",
        f"  test accuracy {100 * summary['test_acc']:.2f} % on {summary['test_n']} images, "
        f"test loss {summary['test_loss']}",
        f"  wall time {summary['wall_time_s']:.1f} s ({summary['step_time_ms']:.1f} ms/step "
        "incl. evaluation)",
    ]
    lines.append(f"  results in {out_dir}" if out_dir is not None
                 else "  (no --out given: nothing saved)")
    return "\n".join(lines)


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    batch_size: int = 1000,
) -> str:
    """Load a checkpoint, evaluate it on a test split, return the line to print."""
    from bnlab.data import load_dataset

    model, config = load_checkpoint(path)
    name = dataset or config.dataset
    data = load_dataset(name, data_dir, download=download)
    try:
        loss, acc = evaluate(model, data.test, batch_size)
    except RuntimeError as exc:
        raise BnlabError(
            f"checkpoint {path} (trained on {config.dataset}) cannot run on {name} "
            f"images {data.in_shape}: {str(exc).splitlines()[0]}"
        ) from None
    return (f"{path}: {config.model} norm={config.norm}, test accuracy {100 * acc:.2f} % "
            f"({len(data.test)} {name} test images), test loss {loss:.4f}")
