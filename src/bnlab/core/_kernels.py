"""The memory-bound loops of batch norm, tiled and threaded. Every array here is (N, C, M).

Why tiles: each kernel does several cheap NumPy operations on the same data. Done on the
whole tensor, every operation is a trip to main memory; done tile by tile (a block of
samples × channels), the second and later operations find the tile in the core's cache, so
a kernel costs about one pass over memory. Tiles also give the threads their share of work
(``_threads.run_parallel``).

Reductions write one partial sum per tile row into a float64 array and add those up in
float64, so the sequential part of every float32 sum stays short.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from bnlab.core._threads import run_parallel

FloatArray = NDArray[np.floating]
Tile = tuple[int, slice, slice]  # (index of the sample block, samples, channels)

# Elements per tile (512 KiB of float32): large enough that NumPy's per-call overhead is
# small, small enough that a tile is still in cache for the kernel's next operation.
# Measured on the 2-core CI machine: 32K elements was 1.3-2x slower, 512K about the same.
_TILE_ELEMENTS = 131072


def _tiles(shape: tuple[int, ...]) -> list[Tile]:
    n, c, m = shape
    if n * c * m == 0:
        return []
    if c * m >= _TILE_ELEMENTS:  # one sample is big: tile over channels within a sample
        cb = max(1, _TILE_ELEMENTS // m)
        return [
            (i, slice(i, i + 1), slice(j, min(j + cb, c)))
            for i in range(n)
            for j in range(0, c, cb)
        ]
    nb = max(1, _TILE_ELEMENTS // (c * m))
    return [(k, slice(i, min(i + nb, n)), slice(0, c)) for k, i in enumerate(range(0, n, nb))]


# Below this many positions per channel, per-channel vectors are expanded to (C, M) first.
_EXPAND_BELOW = 4096

PerChannel = Callable[[slice, slice], FloatArray]


def _per_channel(v: FloatArray, shape: tuple[int, ...]) -> PerChannel:
    """``v`` (C,) as a function of a tile's (samples, channels) slices: an array that
    broadcasts over that (samples, channels, M) tile.

    Speed: NumPy's loops run ~2× faster on operands of one shape than with a broadcast
    one, so short rows get ``v`` expanded: to (C, M) (one sample's size) for M > 1, and to
    a tile's (samples, C, 1) for M = 1 (BatchNorm1d on (N, C)). Long rows keep (C, 1).
    """
    n, c, m = shape
    rows = min(n, max(1, _TILE_ELEMENTS // c))
    # Expand only where the copy is small next to the input (at most 1/8 of it).
    if m == 1 and 8 * rows <= n:
        per_tile = np.ascontiguousarray(np.broadcast_to(v[None, :, None], (rows, c, 1)))
        return lambda ns, cs: per_tile[: ns.stop - ns.start, cs]
    if 1 < m < _EXPAND_BELOW and n >= 8:
        per_sample = np.ascontiguousarray(np.broadcast_to(v[:, None], (c, m)))
        return lambda ns, cs: per_sample[cs]
    column = v[:, None]
    return lambda ns, cs: column[cs]


def _channel_sum(a: FloatArray) -> FloatArray:
    """Σ over samples and positions of a (samples, channels, M) tile, per channel."""
    if a.shape[2] == 1:
        return a[:, :, 0].sum(axis=0)  # rows of C values: NumPy's row-wise adds are fastest
    return np.einsum("ncm->c", a)


def _channel_dot(a: FloatArray, b: FloatArray) -> FloatArray:
    """Σ a·b over samples and positions of a (samples, channels, M) tile, per channel."""
    return np.einsum("ncm,ncm->c", a, b)


def _partials(shape: tuple[int, ...], tiles: list[Tile]) -> NDArray[np.float64]:
    return np.zeros((tiles[-1][0] + 1 if tiles else 1, shape[1]), dtype=np.float64)


def shift_estimate(x: FloatArray) -> FloatArray:
    """Mean per channel of the first samples (~one tile's worth): a shift close to the mean.

    Any value would give the right answer; one near the mean keeps ``E[d]`` small, so
    ``E[d²] − E[d]²`` does not cancel. Reading a sliver of the batch saves a full pass.
    """
    n, c, m = x.shape
    rows = min(n, max(1, -(-_TILE_ELEMENTS // (c * m))))
    return x[:rows].mean(axis=(0, 2), dtype=np.float64).astype(x.dtype)


def centre_and_moments(
    x: FloatArray, shift: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``d = x − shift`` (a new array) with Σd and Σd² per channel, in one pass over x."""
    d = np.empty_like(x)
    tiles = _tiles(x.shape)
    part_sum = _partials(x.shape, tiles)
    part_sq = _partials(x.shape, tiles)
    shift_e = _per_channel(shift, x.shape)

    def work(t: Tile) -> None:
        k, ns, cs = t
        dt = d[ns, cs]
        np.subtract(x[ns, cs], shift_e(ns, cs), out=dt)
        part_sum[k, cs] = _channel_sum(dt)
        part_sq[k, cs] = _channel_dot(dt, dt)

    run_parallel(work, tiles)
    return d, part_sum.sum(axis=0).astype(x.dtype), part_sq.sum(axis=0).astype(x.dtype)


def affine(x: FloatArray, scale: FloatArray, shift: FloatArray) -> FloatArray:
    """A new ``x·scale + shift`` (per channel)."""
    y = np.empty_like(x)
    tiles = _tiles(x.shape)
    scale_e, shift_e = _per_channel(scale, x.shape), _per_channel(shift, x.shape)

    def work(t: Tile) -> None:
        _, ns, cs = t
        yt = y[ns, cs]
        np.multiply(x[ns, cs], scale_e(ns, cs), out=yt)
        yt += shift_e(ns, cs)

    run_parallel(work, tiles)
    return y


def sum_and_dot(dy: FloatArray, xhat: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Σdy and Σdy·xhat per channel (dbias and dweight), in one pass over both."""
    tiles = _tiles(dy.shape)
    part_sum = _partials(dy.shape, tiles)
    part_dot = _partials(dy.shape, tiles)

    def work(t: Tile) -> None:
        k, ns, cs = t
        dyt = dy[ns, cs]
        part_sum[k, cs] = _channel_sum(dyt)
        part_dot[k, cs] = _channel_dot(dyt, xhat[ns, cs])

    run_parallel(work, tiles)
    return part_sum.sum(axis=0).astype(dy.dtype), part_dot.sum(axis=0).astype(dy.dtype)


def batch_norm_dx(
    dy: FloatArray, d: FloatArray, gain: FloatArray, k: FloatArray, c: FloatArray
) -> FloatArray:
    """``dx = gain·(dy + d·k + c)`` (``gain``, ``k``, ``c`` per channel), written into ``d``.

    Speed: reusing the forward's buffer saves allocating (and page-faulting) a new tensor
    and a third of the memory; the cost is that a cache serves one backward, as in torch.
    """
    tiles = _tiles(dy.shape)
    gain_e, k_e, c_e = (_per_channel(v, dy.shape) for v in (gain, k, c))

    def work(t: Tile) -> None:
        _, ns, cs = t
        o = d[ns, cs]
        o *= k_e(ns, cs)
        o += c_e(ns, cs)
        o += dy[ns, cs]
        o *= gain_e(ns, cs)

    run_parallel(work, tiles)
    return d
