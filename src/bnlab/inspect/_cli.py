"""``bnlab inspect``: argument definitions and the handler (lazy imports, argparse only)."""

from __future__ import annotations

import argparse
from typing import Any

from bnlab._argtypes import non_negative_float, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a model.safetensors from 'bnlab train' (default: a fresh --model)")
    p.add_argument("--model", default="paper_mlp",
                   help="without CHECKPOINT: the model to build (see 'bnlab models')")
    p.add_argument("--norm", default="bn", help="without CHECKPOINT: its norm (bn, none, …)")
    p.add_argument("--compare-norm", default=None, metavar="NORM",
                   help="also inspect the same architecture with this norm, freshly "
                   "initialised (labelled NAME-NORM-init next to a checkpoint), on the same "
                   "batches, side by side; e.g. none")
    p.add_argument("--dataset", default=None,
                   help="training data (default: the checkpoint's dataset, else digits)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--steps", type=positive_int, default=50,
                   help="training steps for the update:data panel")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.0, help="SGD momentum")
    p.add_argument("--init-scale", type=positive_float, default=1.0,
                   help="without CHECKPOINT: multiply every conv/linear weight after init")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--out", default="bnlab-inspect", metavar="DIR",
                   help="where the PNGs, stats.json and index.html go")


def _build(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], str, Any]:
    """[(label, model)], the dataset name and its splits."""
    import torch

    from bnlab.data import load_dataset
    from bnlab.models import build_model, scale_init

    models: list[tuple[str, Any]] = []
    if args.checkpoint is not None:
        from bnlab.train import load_checkpoint

        model, config = load_checkpoint(args.checkpoint)
        dataset = args.dataset or config.dataset
        splits = load_dataset(dataset, args.data_dir, download=not args.no_download)
        models.append((f"{config.model}-{config.norm}", model))
        arch: dict[str, Any] = {"name": config.model, "placement": config.placement,
                                "model_kwargs": dict(config.model_kwargs),
                                "init_scale": config.init_scale}
    else:
        dataset = args.dataset or "digits"
        splits = load_dataset(dataset, args.data_dir, download=not args.no_download)
        arch = {"name": args.model, "placement": "before", "model_kwargs": {},
                "init_scale": args.init_scale}
    norms = [] if args.checkpoint is not None else [args.norm]
    if args.compare_norm is not None:
        norms.append(args.compare_norm)
    for norm in norms:
        torch.manual_seed(args.seed)
        model = build_model(arch["name"], norm=norm, placement=arch["placement"],
                            in_shape=splits.in_shape, num_classes=splits.num_classes,
                            **arch["model_kwargs"])
        scale_init(model, arch["init_scale"])
        label = f"{arch['name']}-{norm}"
        if args.checkpoint is not None:
            label += "-init"  # freshly initialised, next to the trained checkpoint
        models.append((label, model))
    return models, dataset, splits


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from bnlab.inspect.panels import inspect
    from bnlab.inspect.report import write_report

    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models, dataset, splits = _build(args)
    x, y = splits.train.tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    need = args.steps * args.batch_size
    idx = order.repeat(need // len(x) + 1)[:need]
    batches = [(x[idx[i:i + args.batch_size]], y[idx[i:i + args.batch_size]])
               for i in range(0, need, args.batch_size)]
    results = [inspect(model, batches, steps=args.steps, lr=args.lr, momentum=args.momentum,
                       label=label, progress=None) for label, model in models]
    page = write_report(results, args.out,
                        title=f"bnlab inspect: {', '.join(r.label for r in results)} on "
                        f"{dataset}, {args.steps} steps of SGD lr {args.lr:g}")
    for r in results:
        sat = r.mean_saturation()
        print(f"{r.label:<16} loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}  "
              f"saturated {'n/a' if sat is None else f'{100 * sat:.1f}%'}  "
              f"log10 update:data {r.median_update_ratio():+.2f}")
    print(f"wrote {page} ({time.perf_counter() - start:.1f} s)")
    return 0
