"""``bnlab doctor``: argument definitions and the handler (argparse only, lazy imports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bnlab._argtypes import positive_int
from bnlab.errors import BnlabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CHECKPOINT_OR_MODULE",
                   help="a model.safetensors written by 'bnlab train', or "
                   "'package.module:factory'")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="mnist, fashion-mnist or digits (default: static checks only)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding mnist/ and fashion-mnist/ (then $BNLAB_DATA_DIR, "
                   "then ~/.cache/bnlab)")
    p.add_argument("--no-download", action="store_true",
                   help="never download; fail if the files are not found locally")
    p.add_argument("--num-batches", type=positive_int, default=20,
                   help="training batches for the dynamic checks")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="their size: use the per-device batch size you train with (the "
                   "tiny-batch and train-mode checks depend on it; recalibration does not)")
    p.add_argument("--eval-subset", type=positive_int, default=None, metavar="N",
                   help="measure loss/accuracy on the first N test images (default: all)")
    p.add_argument("--half", action="store_true",
                   help="the model will run in float16 (float16 overflow is an error)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the re-batching and dropout of the dynamic checks")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write a self-contained HTML page with the statistics-gap plot")
    p.add_argument("--fail-on", choices=("info", "warning", "error"), default="warning",
                   help="exit 1 when a finding of this severity or worse exists")


def load_target(target: str) -> tuple[Any, str, tuple[int, ...] | None]:
    """(model, display name, input shape if known) for a checkpoint path or import string."""
    from torch import nn

    path = Path(target)
    if path.is_file():
        head = path.read_bytes()[:8]
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise BnlabError(
                f"{target} is a torch pickle (torch.save); bnlab never unpickles files: "
                "give a model.safetensors written by 'bnlab train', or "
                "'package.module:factory'")
        from bnlab.train import load_checkpoint

        model, config = load_checkpoint(path)
        from bnlab.data import DATASET_INFO

        in_shape = DATASET_INFO.get(config.dataset, (None, None))[0]
        return model, f"{path} ({config.model}, norm={config.norm})", in_shape
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise BnlabError(f"{target}: no such file, and not an import string; expected a "
                         "checkpoint file or 'package.module:factory'")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BnlabError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BnlabError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise BnlabError(f"{target}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, nn.Module):
        raise BnlabError(f"{target} is not a torch.nn.Module (got {type(obj).__name__}); "
                         "expected a module or a callable returning one")
    return obj, target, None


def run(args: argparse.Namespace) -> int:
    import torch

    from bnlab.doctor import examine

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, name, in_shape = load_target(args.target)
    batches = eval_batches = None
    data_name = None
    if args.data is not None:
        from bnlab.data import load_dataset

        data = load_dataset(args.data, args.data_dir, download=not args.no_download)
        if in_shape is not None and tuple(in_shape) != tuple(data.in_shape):
            raise BnlabError(f"{name} expects {tuple(in_shape)} inputs; {args.data} has "
                             f"{tuple(data.in_shape)}")
        x, y = data.train.tensors
        n = min(len(x), args.num_batches * args.batch_size)
        batches = list(zip(torch.split(x[:n], args.batch_size),
                           torch.split(y[:n], args.batch_size), strict=True))
        tx, ty = data.test.tensors
        m = len(tx) if args.eval_subset is None else min(args.eval_subset, len(tx))
        eval_batches = list(zip(torch.split(tx[:m], 250), torch.split(ty[:m], 250),
                                strict=True))
        data_name = (f"{args.data}: {len(batches)} training batch(es) of {args.batch_size}; "
                     f"loss/accuracy on {m} test images")
    report = examine(model, batches, eval_batches=eval_batches, half=args.half,
                     seed=args.seed, name=name, data_name=data_name, progress=True)
    if args.json:
        print(report.to_json())
    else:
        print(report.format_table())
    if args.html:
        from bnlab._io import atomic_write_text

        try:
            atomic_write_text(args.html, report.to_html())
        except OSError as exc:
            raise BnlabError(f"--html {args.html}: {exc.strerror or exc}") from None
        print(f"wrote {args.html}", file=sys.stderr)
    return report.exit_code(args.fail_on)
