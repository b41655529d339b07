"""SyncBatchNorm2d forward+backward on 2 gloo processes vs local BatchNorm2d, same per-rank batch.

Run: ``python benchmarks/bench_sync.py [--reps 30] [--shape 32 64 28 28] [--nproc 2]``

Every rank times, in the same process and on the same (N, C, H, W) float32 batch:

* ``torch BN``: ``torch.nn.BatchNorm2d`` (local statistics, torch's C++ kernel): the reference;
* ``bnlab local``: ``bnlab.nn.SyncBatchNorm`` in a group of one (same code, no collectives);
* ``bnlab sync``: ``bnlab.nn.SyncBatchNorm`` over all ranks (one all_gather forward, one
  all_reduce backward).

A step is forward + backward; the ranks start each step together (barrier, not timed). The
median over the repetitions is printed with its ratio to torch BN measured in the same run.
All ranks run at once, so they compete for the same cores equally in every variant.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnlab.nn import SyncBatchNorm


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time_steps(bn: nn.Module, x: torch.Tensor, dy: torch.Tensor, reps: int) -> float:
    times = []
    for i in range(reps + 3):  # 3 warm-up steps
        dist.barrier()
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        bn(xi).backward(dy)
        elapsed = time.perf_counter() - t0
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, shape: tuple[int, ...], reps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        # Every rank must create every subgroup, in the same order.
        solo = [dist.new_group([r]) for r in range(world)][rank]
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(*shape, generator=g)
        dy = torch.randn(*shape, generator=g)
        channels = shape[1]
        results = {
            "torch BN": _time_steps(nn.BatchNorm2d(channels), x, dy, reps),
            "bnlab local": _time_steps(SyncBatchNorm(channels, process_group=solo), x, dy, reps),
            "bnlab sync": _time_steps(SyncBatchNorm(channels), x, dy, reps),
        }
        gathered: list[dict[str, float] | None] = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            ref = statistics.median(r["torch BN"] for r in gathered if r is not None)
            print(f"shape {shape} float32 per rank, {world} gloo processes, {reps} reps, "
                  f"1 thread each; median over ranks of per-rank medians")
            for name in results:
                t = statistics.median(r[name] for r in gathered if r is not None)
                print(f"  {name:12s} {t * 1e3:8.2f} ms/step   ratio vs torch BN {t / ref:5.2f}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 28, 28])
    args = parser.parse_args()
    if args.reps < 20:
        parser.error("--reps must be at least 20 for a stable median")
    mp.spawn(_worker, args=(args.nproc, _free_port(), tuple(args.shape), args.reps),
             nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
