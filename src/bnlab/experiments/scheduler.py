"""Where the lab's runs execute: forked children, a few at a time, with their threads set.

``--jobs N`` keeps N children busy with ``cores // N`` torch threads each; a child performs
one task (one run, or a group of seeds trained stacked: one job). A child dies with its
parent (``PR_SET_PDEATHSIG``), so a SIGKILL of ``bnlab experiment`` loses at most the
runs in flight. Before any fork, :func:`warm_up` pays the one-time cost of a first
training step once, in the parent.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from bnlab._progress import Progress

if TYPE_CHECKING:
    from bnlab.data import DatasetSplits
    from bnlab.train import TrainConfig

T = TypeVar("T")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(jobs: int) -> int:
    """Threads for each of ``jobs`` parallel runs so that jobs × threads <= cores."""
    return max(1, available_cores() // jobs)


def warm_up(configs: Iterable[TrainConfig], data: DatasetSplits, *,
            stacked: Iterable[TrainConfig] = ()) -> None:
    """Train each model of ``configs`` for one step here, in the parent, before any fork:
    the first step in a process pays ~1 s of one-time setup (lazy imports, kernel
    selection) that every forked run would otherwise pay again; likewise two seeds of each
    model of ``stacked`` together (:func:`bnlab.train.stacked.train_stacked`, whose first
    call sets up ``torch.func``). One thread, so no OpenMP pool exists at fork time (a
    forked child must not inherit one); restored afterwards."""
    import torch

    from bnlab.train import train
    from bnlab.train.stacked import train_stacked

    def models(cfgs: Iterable[TrainConfig]) -> list[TrainConfig]:
        seen: dict[str, TrainConfig] = {}
        for config in cfgs:
            seen.setdefault(config.model, config)
        return [replace(c, steps=1, epochs=None, eval_every=1, eval_subset=10,
                        eval_train=False, train_subset=None, threads=1, batch_size=2)
                for c in seen.values()]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for tiny in models(configs):
            train(tiny, out_dir=None, progress=False, data=data)
        for tiny in models(stacked):
            train_stacked([replace(tiny, seed=0), replace(tiny, seed=1)], data)
    finally:
        torch.set_num_threads(threads)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned runs)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except OSError:
        pass


def _child(work: Callable[[T], None], task: T, threads: int) -> None:
    _die_with_parent()
    import torch

    from bnlab import core

    torch.set_num_threads(threads)
    core.set_num_threads(threads)  # the NumPy core's pool and OpenBLAS (covariate-shift)
    work(task)


def run_forked(tasks: Sequence[T], work: Callable[[T], None], *, jobs: int, threads: int,
               bar: Progress, describe: Callable[[T], str], title: str,
               size: Callable[[T], int] = lambda task: 1) -> list[T]:
    """``work(task)`` for every task, each in a forked child with ``threads`` threads, at
    most ``jobs`` at a time; the progress bar counts the runs (``size(task)`` per task) of
    the children that succeeded. Returns
    the tasks whose child failed (a non-zero exit). Children still running when this
    returns early (an exception, ^C) are killed."""
    ctx = multiprocessing.get_context("fork")
    queue = deque(tasks)
    active: dict[Any, T] = {}
    failed: list[T] = []
    try:
        while queue or active:
            while queue and len(active) < jobs:
                task = queue.popleft()
                proc = ctx.Process(target=_child, args=(work, task, threads))
                proc.start()
                active[proc] = task
                bar.set_postfix(experiment=title,
                                running=" | ".join(describe(t) for t in active.values()))
            ready = multiprocessing.connection.wait([p.sentinel for p in active], timeout=5.0)
            for proc in [p for p in active if p.sentinel in ready]:
                proc.join()
                task = active.pop(proc)
                if proc.exitcode == 0:
                    bar.update(size(task))
                else:
                    failed.append(task)
    finally:
        for proc in active:
            proc.kill()
            proc.join()
    return failed
