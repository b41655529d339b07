"""The core's thread count and its small pool.

NumPy releases the GIL inside its element-wise and reduction loops, so a few Python threads
that each take a slice of the batch run truly in parallel. The kernels in ``_kernels.py``
split their work into one contiguous range of tiles per thread (one task per thread keeps
the pool's per-task overhead out of the timings).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import numpy as np

T = TypeVar("T")

__all__ = ["get_num_threads", "run_parallel", "set_num_threads"]


def _machine_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_lock = threading.Lock()
_num_threads = _machine_cores()
_pool: ThreadPoolExecutor | None = None


@cache
def _blas_thread_setters() -> list[Callable[[int], None]]:
    """``openblas_set_num_threads`` of every OpenBLAS this process has loaded (Linux only).

    NumPy's matmul (the Linear layers) runs in OpenBLAS's own threads; pinning them too
    keeps a 1-thread measurement honest. Found through /proc/self/maps with ctypes, so no
    dependency is needed; on other systems this finds nothing and BLAS keeps its default.
    """
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower()}
    except OSError:
        return []
    setters = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                       "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                setters.append(fn)
                break
    return setters


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the core's kernels and in NumPy's OpenBLAS (default: all cores)."""
    global _num_threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be a whole number >= 1, got {n!r}")
    with _lock:
        if n == _num_threads and _pool is not None:
            return
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n
        for set_blas_threads in _blas_thread_setters():
            set_blas_threads(n)


def get_num_threads() -> int:
    """The number of threads the core's kernels use."""
    return _num_threads


def run_parallel(work: Callable[[T], None], items: Sequence[T]) -> None:
    """Call ``work(item)`` for every item, the items split into one contiguous run per thread."""
    global _pool
    threads = min(_num_threads, len(items))

    def run_range(lo: int, hi: int) -> None:
        # NaN/Inf input propagates silently, as in torch (no "invalid value" warnings);
        # NumPy's error state is per thread, so each worker sets its own.
        with np.errstate(invalid="ignore", over="ignore"):
            for item in items[lo:hi]:
                work(item)

    if threads <= 1:
        run_range(0, len(items))
        return
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_num_threads, thread_name_prefix="bnlab")
        pool = _pool
    bounds = [len(items) * i // threads for i in range(threads + 1)]
    futures = [pool.submit(run_range, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    run_range(bounds[0], bounds[1])  # the calling thread takes the first share
    for f in futures:
        f.result()
