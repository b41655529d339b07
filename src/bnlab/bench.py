"""The core's speed against torch's CPU kernels, measured in one run (``bnlab bench``).

For each shape and thread count: bnlab core and torch forward+backward in training, and
forward in eval, each the median of ``reps`` timings after warm-up, with both sides pinned
to the same number of threads. Peak extra memory is the ``tracemalloc`` peak of one
forward+backward, in units of the input's size.

Effective bandwidth = bytes that must move / bnlab's time. The bytes are the least memory
traffic the work needs: forward+backward 8 passes over the tensor (forward reads x for the
statistics, reads it again and writes y; backward reads dy and x for the two sums, reads
them again and writes dx), eval forward 2 (read x, write y). Its reference is the copy
bandwidth of ``np.copyto`` between two preallocated arrays of the input's size (bytes read
+ bytes written / time), split over the same threads and timed in the same repetitions: a
tensor that fits in the last-level cache is compared with a cache-resident copy, one that
does not with a copy from main memory.

Clock: at 1 thread the CPU time of the calling thread (``time.thread_time``: NumPy,
OpenBLAS and torch's kernels and CPU autograd all run on it then), which leaves out the
time other jobs on a shared machine take the core; it includes page faults. With more
threads, wall time. Absolute times on a shared machine mean little; the ratios are the
result (bnlab's, torch's and the copy's repetitions alternate, so all see the same load).
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import bnlab.core as core
from bnlab.core._threads import run_parallel

__all__ = ["SHAPES", "BenchRow", "copy_bandwidth", "format_table", "run_bench"]

# (label, shape, channels_last): the shapes the speed targets are stated for. The
# channels-last case is NHWC data handed over as its (N, C, H, W) transposed view.
SHAPES: list[tuple[str, tuple[int, ...], bool]] = [
    ("NCHW", (64, 64, 28, 28), False),
    ("NCHW", (256, 256, 14, 14), False),
    ("NCDHW", (8, 32, 16, 32, 32), False),
    ("NC", (4096, 1024), False),
    ("NHWC view", (64, 64, 28, 28), True),
]

TRAIN_PASSES = 8  # read x twice and write y; read dy and xhat twice and write dx
EVAL_PASSES = 2  # read x, write y


@dataclass(frozen=True)
class BenchRow:
    label: str
    shape: tuple[int, ...]
    mode: str  # "train fwd+bwd" / "eval fwd"
    threads: int
    bnlab_ms: float
    torch_ms: float
    gb_per_s: float
    copy_gb_per_s: float
    peak_extra: float | None  # tracemalloc peak / input bytes (train only)

    @property
    def ratio(self) -> float:
        return self.bnlab_ms / self.torch_ms

    @property
    def copy_fraction(self) -> float:
        return self.gb_per_s / self.copy_gb_per_s


def _median_ms(
    *fns: Callable[[], object], reps: int, warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Median time of each function; their repetitions alternate, so that a change in the
    machine's load (it is shared) hits every side alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            start = clock()
            fn()
            ts.append(clock() - start)
    return [1e3 * statistics.median(ts) for ts in times]


def _clock(threads: int) -> Callable[[], float]:
    """CPU time of this thread at 1 thread (robust to other jobs), wall time otherwise."""
    return time.thread_time if threads == 1 else time.perf_counter


def _copier(nbytes: int) -> Callable[[], None]:
    """A copy of ``nbytes`` between two preallocated (already touched) arrays, split into
    1 MiB chunks over the core's threads."""
    src = np.ones(max(1, nbytes // 4), np.float32)
    dst = np.zeros_like(src)
    chunks = [slice(i, i + 2**18) for i in range(0, src.size, 2**18)]

    def copy() -> None:
        run_parallel(lambda s: np.copyto(dst[s], src[s]), chunks)

    return copy


def copy_bandwidth(threads: int, nbytes: int, reps: int = 10) -> float:
    """GB/s of a ``nbytes`` copy (bytes read + bytes written), split over ``threads``."""
    saved = core.get_num_threads()
    core.set_num_threads(threads)
    try:
        ms = _median_ms(_copier(nbytes), reps=reps, clock=_clock(threads))[0]
    finally:
        core.set_num_threads(saved)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _layer_pair(shape: tuple[int, ...]) -> tuple[object, object]:
    import torch

    dims = len(shape) - 2
    ours = {0: core.BatchNorm1d, 1: core.BatchNorm1d, 2: core.BatchNorm2d,
            3: core.BatchNorm3d}[dims](shape[1])
    theirs = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
              3: torch.nn.BatchNorm3d}[dims](shape[1])
    return ours, theirs


def bench_shape(
    label: str, shape: tuple[int, ...], channels_last: bool, threads: int, reps: int
) -> list[BenchRow]:
    import torch

    torch.set_num_threads(threads)
    core.set_num_threads(threads)
    rng = np.random.default_rng(0)
    if channels_last:  # NHWC memory, seen as NCHW
        x = rng.standard_normal((shape[0], *shape[2:], shape[1]), np.float32)
        x = np.moveaxis(x, -1, 1)
    else:
        x = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    ours, theirs = _layer_pair(shape)
    tx = torch.from_numpy(x).requires_grad_(True)
    tdy = torch.from_numpy(dy)
    nbytes = x.nbytes
    copy = _copier(nbytes)

    def ours_train() -> None:
        ours(x)  # type: ignore[operator]
        ours.backward(dy)  # type: ignore[attr-defined]

    def torch_train() -> None:
        theirs(tx).backward(tdy)  # type: ignore[operator]
        tx.grad = None

    def ours_eval() -> None:
        ours(x)  # type: ignore[operator]

    def torch_eval() -> None:
        with torch.no_grad():
            theirs(tx)  # type: ignore[operator]

    rows = []
    for mode, mine, ref, passes in (
        ("train fwd+bwd", ours_train, torch_train, TRAIN_PASSES),
        ("eval fwd", ours_eval, torch_eval, EVAL_PASSES),
    ):
        training = mode.startswith("train")
        ours.train(training)  # type: ignore[attr-defined]
        theirs.train(training)  # type: ignore[attr-defined]
        bnlab_ms, torch_ms, copy_ms = _median_ms(mine, ref, copy, reps=reps,
                                                 clock=_clock(threads))
        peak = None
        if training:
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                ours._cache = None  # type: ignore[attr-defined]  # start from nothing kept
                mine()
                peak = (tracemalloc.get_traced_memory()[1] - base) / nbytes
            finally:
                tracemalloc.stop()
        gbs = passes * nbytes / (bnlab_ms * 1e-3) / 1e9
        copy_gbs = 2 * nbytes / (copy_ms * 1e-3) / 1e9
        rows.append(BenchRow(label, shape, mode, threads, bnlab_ms, torch_ms, gbs, copy_gbs,
                             peak))
    return rows


def run_bench(
    threads: Sequence[int] = (1, 2), reps: int = 20,
    shapes: Sequence[tuple[str, tuple[int, ...], bool]] = tuple(SHAPES),
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Every shape at every thread count; restores the thread settings afterwards."""
    import torch

    saved = torch.get_num_threads(), core.get_num_threads()
    rows: list[BenchRow] = []
    try:
        for t in threads:
            for label, shape, channels_last in shapes:
                if progress is not None:
                    progress(f"{label} {shape} threads={t}")
                rows.extend(bench_shape(label, shape, channels_last, t, reps))
    finally:
        torch.set_num_threads(saved[0])
        core.set_num_threads(saved[1])
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_table(rows: Sequence[BenchRow]) -> str:
    header = ["shape", "mode", "threads", "bnlab ms", "torch ms", "ratio", "GB/s",
              "% copy", "peak mem"]
    body = [
        [f"{r.label} {'x'.join(map(str, r.shape))}", r.mode, str(r.threads),
         f"{r.bnlab_ms:.2f}", f"{r.torch_ms:.2f}", f"{r.ratio:.2f}", f"{r.gb_per_s:.1f}",
         f"{100 * r.copy_fraction:.0f}%",
         "" if r.peak_extra is None else f"{r.peak_extra:.2f}x"]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) + " |"
              for b in body]
    return "\n".join(lines)


def describe_run(rows: Sequence[BenchRow]) -> str:
    import torch

    return (
        f"{time.strftime('%Y-%m-%d')}, {cpu_name()} ({core.get_num_threads()} cores), "
        f"NumPy {np.__version__}, torch {torch.__version__}; float32, median of the "
        f"timings after warm-up (1 thread: CPU time of the thread; more: wall time). "
        f"ratio = bnlab / torch (< 1: bnlab faster). GB/s = bytes that must move / bnlab's "
        f"time: 8 passes over the tensor (train) or 2 (eval); % copy compares it with "
        f"np.copyto of the input's size at the same thread count, timed in the same "
        f"repetitions. peak mem is tracemalloc's peak during one forward+backward / input "
        f"size."
    )


def main(threads: Sequence[int] | None = None, reps: int = 20, quick: bool = False) -> int:
    import sys

    if threads is None:
        threads = sorted({1, core.get_num_threads()})
    shapes = SHAPES[:1] if quick else SHAPES
    rows = run_bench(threads, reps, shapes,
                     progress=lambda s: print(f"measuring {s}", file=sys.stderr, flush=True))
    print(format_table(rows))
    print()
    print(describe_run(rows))
    return 0
