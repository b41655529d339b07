"""The ``bnlab train``, ``eval`` and ``models`` commands: flags and printed text.

Every :class:`~bnlab.train.config.TrainConfig` field becomes one ``bnlab train`` flag
(``--batch-size`` for ``batch_size``, or the field's ``flag``), with the field's default
and help text: a new field is a new flag without another edit. ``--nproc N`` writes the
run (config and options) as JSON into the launcher's temporary folder and starts the
workers with ``bnlab train --job FILE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

from bnlab._argtypes import positive_int, real, whole
from bnlab.errors import BnlabError
from bnlab.train.config import ConfigError, TrainConfig, config_fields

JOB_FLAG = "--job"


def flag_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (numbers, null, true)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in config_fields():
        kind = hints[f.name]
        target: Any = p
        if "group" in f.metadata:
            if f.metadata["group"] not in groups:
                groups[f.metadata["group"]] = p.add_mutually_exclusive_group()
            target = groups[f.metadata["group"]]
        common: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if "metavar" in f.metadata:
            common["metavar"] = f.metadata["metavar"]
        if kind is bool:
            target.add_argument(flag_of(f), action="store_true", **common)
        elif typing.get_origin(kind) is dict:
            common.setdefault("metavar", "KEY=VALUE")
            target.add_argument(flag_of(f), type=_key_value, action="append", default=[],
                                **common)
        else:
            base = {int: whole, float: real}.get(_scalar(kind), str)
            target.add_argument(flag_of(f), type=base, default=f.default, **common)


def _scalar(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    for f in config_fields():
        value = getattr(args, f.name)
        values[f.name] = dict(value) if typing.get_origin(
            typing.get_type_hints(TrainConfig)[f.name]) is dict else value
    for f in config_fields():
        if "clears" in f.metadata and values[f.name] is not None:
            values[f.metadata["clears"]] = None
    return TrainConfig(**values)


def flag_error(exc: ConfigError) -> BnlabError:
    """``exc`` worded in flags: ``--lr must be …`` for the field ``lr``."""
    flags = {f.name: flag_of(f) for f in config_fields()} | {"out_dir": "--out"}
    flag = flags.get(exc.field)
    text = str(exc)
    if flag is None:
        return BnlabError(text)
    if text.startswith(exc.field + " "):
        return BnlabError(flag + text[len(exc.field):])
    return BnlabError(f"{flag}: {text}")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding mnist/ and fashion-mnist/ (looked in first; then "
                   "$BNLAB_DATA_DIR, then ~/.cache/bnlab)")
    p.add_argument("--no-download", action="store_true",
                   help="never download; fail if the files are not found locally")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_data_arguments(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.jsonl, model.safetensors and summary.json here "
                   "(default: write nothing)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="local worker processes (torch.distributed.run, gloo on CPU)")
    p.add_argument(JOB_FLAG, default=None, metavar="FILE", help=argparse.SUPPRESS)


def job_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run as a JSON object: the config and the options that are not config fields."""
    return {"config": config_from_args(args).to_dict(), "out": args.out,
            "overwrite": args.overwrite, "data_dir": args.data_dir,
            "download": not args.no_download}


def read_job(path: str | os.PathLike[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, train() options) from a job file written by :func:`job_of`'s caller."""
    try:
        job = json.loads(Path(path).read_text(encoding="utf-8"))
        options = {k: job[k] for k in ("out", "overwrite", "data_dir", "download")}
        config = TrainConfig.from_dict(job["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BnlabError(f"{JOB_FLAG} {path}: not a bnlab job file ({exc})") from None
    return config, options


def run_train(args: argparse.Namespace) -> int:
    from bnlab.train.config import validate_config
    from bnlab.train.loop import train

    try:
        if args.job is not None:
            config, options = read_job(args.job)
        else:
            config = config_from_args(args)
            options = {k: v for k, v in job_of(args).items() if k != "config"}
        validate_config(config)
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            from bnlab.distributed import launch

            return int(launch(args.nproc, ["train"], job=job_of(args), job_flag=JOB_FLAG,
                              timeout_s=config.dist_timeout_s))
        out = options.pop("out")
        result = train(config, out, **options)
    except ConfigError as exc:
        raise flag_error(exc) from None
    if result.rank == 0:
        print(format_summary(result.summary, out))
    return 0


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


# --------------------------------------------------------------------------- eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model.safetensors written by 'bnlab train' (or "
                   "the run folder holding it)")
    p.add_argument("--dataset", default=None, help="default: the dataset it was trained on")
    add_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=1000,
                   help="evaluation batch size (no effect on the result)")


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    batch_size: int = 1000,
) -> str:
    """Load a checkpoint (plain, or folded by ``bnlab fold``), evaluate it on a test split,
    return the line to print."""
    from bnlab.data import load_dataset
    from bnlab.train.checkpoint import (
        FOLDED,
        FORMATS,
        load_checkpoint,
        load_folded,
        read_checkpoint_info,
    )
    from bnlab.train.loop import evaluate
    from bnlab.train.runfiles import checkpoint_path

    path = checkpoint_path(path)
    folded = read_checkpoint_info(path, FORMATS).format == FOLDED
    model, config = load_folded(path) if folded else load_checkpoint(path)
    name = dataset or config.dataset
    data = load_dataset(name, data_dir, download=download)
    try:
        loss, acc = evaluate(model, data.test, batch_size)
    except RuntimeError as exc:
        raise BnlabError(
            f"checkpoint {path} (trained on {config.dataset}) cannot run on {name} "
            f"images {data.in_shape}: {str(exc).splitlines()[0]}"
        ) from None
    kind = " (folded)" if folded else ""
    return (f"{path}: {config.model} norm={config.norm}{kind}, test accuracy {100 * acc:.2f} % "
            f"({len(data.test)} {name} test images), test loss {loss:.4f}")


def run_eval(args: argparse.Namespace) -> int:
    print(evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                              download=not args.no_download, batch_size=args.batch_size))
    return 0


# --------------------------------------------------------------------------- models


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", help="input shape to count parameters for")


def format_model_table(dataset: str = "mnist") -> str:
    """The table ``bnlab models`` prints, parameter counts for ``dataset``'s input shape."""
    from bnlab.data import DATASET_INFO, check_dataset_name
    from bnlab.models import model_table, norm_names

    check_dataset_name(dataset)
    in_shape, num_classes = DATASET_INFO[dataset]
    lines = [f"models (parameter counts for {dataset}, input {in_shape}):",
             f"{'name':<10} {'params bn':>10} {'params none':>12}  options / description"]
    for r in model_table(in_shape, num_classes):
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or "-"
        lines.append(f"{r['name']:<10} {r['params_bn']:>10,} {r['params_none']:>12,}  "
                     f"{opts}")
        lines.append(f"{'':<36}{r['description']}")
    lines.append(f"norms: {', '.join(norm_names())} (placement: before | after)")
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> int:
    print(format_model_table(args.dataset))
    return 0
