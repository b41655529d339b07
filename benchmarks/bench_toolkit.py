"""Toolkit speed, as ratios against a reference measured in the same run.

    python benchmarks/bench_toolkit.py [--reps 20] [--threads 2]

1. forward+backward on (64, 64, 28, 28) float32, training mode: BatchRenorm2d and
   GhostBatchNorm2d(virtual 16) vs torch.nn.BatchNorm2d (targets: <= 1.5x, <= 2x);
2. inference of fold_bn(seed_cnn) vs the unfolded seed CNN in eval mode, batch 256
   (target: speed-up >= 1.15x), in torch's default NCHW layout (the target's line); then
   the same in channels-last, the layout PyTorch recommends for CNN inference on the CPU,
   for context: there the rest of the network is faster, so BN is a larger share of it.

Median of --reps repetitions after warm-up; the cases are interleaved rep by rep, so a busy
shared CPU slows them alike, in a random order each rep (see ``_medians``). Absolute times
are printed for context only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bnlab.models import build_model
from bnlab.nn import BatchRenorm2d, GhostBatchNorm2d, fold_bn


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 3) -> dict:
    """Median time of each case; every rep runs all cases once, in a fresh random order.

    The order matters on its own: a case's large allocations are faster or slower
    depending on what the previous case freed (measured: the same BatchNorm2d timed twice
    in a fixed order differed by up to 24 %). Shuffling each rep (seeded) spreads that
    effect evenly over the cases instead of always charging it to the same one.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            times[name].append(_timed(cases[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.randn(64, 64, 28, 28, requires_grad=True)
    g = torch.randn(64, 64, 28, 28)
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(64),
        "BatchRenorm2d": BatchRenorm2d(64, warmup_steps=0),
        "GhostBatchNorm2d(16)": GhostBatchNorm2d(64, 16),
    }
    med = _medians({k: _fwd_bwd(m, x, g) for k, m in layers.items()}, args.reps)
    ref = med["BatchNorm2d"]
    print(f"fwd+bwd (64, 64, 28, 28) float32, {args.threads} threads, median of {args.reps}")
    targets = {"BatchRenorm2d": 1.5, "GhostBatchNorm2d(16)": 2.0}
    for name, t in med.items():
        line = f"  {name:22s} {1e3 * t:8.2f} ms  {t / ref:5.2f}x BatchNorm2d"
        if name in targets:
            verdict = "ok" if t / ref <= targets[name] else "MISSED"
            line += f"  (target <= {targets[name]}x: {verdict})"
        print(line)

    print(f"seed_cnn inference, batch 256, median of {args.reps}")
    for layout in (torch.contiguous_format, torch.channels_last):
        model = build_model("seed_cnn", norm="bn").eval().to(memory_format=layout)
        folded = fold_bn(model).to(memory_format=layout)
        xb = torch.randn(256, 1, 28, 28).contiguous(memory_format=layout)
        with torch.inference_mode():
            diff = float((folded(xb) - model(xb)).abs().max())
            med = _medians({"unfolded": lambda m=model, x=xb: m(x),
                            "folded": lambda m=folded, x=xb: m(x)}, args.reps)
        speedup = med["unfolded"] / med["folded"]
        if layout == torch.contiguous_format:
            name, verdict = "NCHW", f"(target >= 1.15x: {'ok' if speedup >= 1.15 else 'MISSED'})"
        else:
            name, verdict = "channels-last", "(context)"
        print(f"  {name:13s} unfolded {1e3 * med['unfolded']:7.2f} ms   folded "
              f"{1e3 * med['folded']:7.2f} ms   speed-up {speedup:.2f}x {verdict}  "
              f"max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
