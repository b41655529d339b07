"""The IDX file format of MNIST and Fashion-MNIST, gzip-compressed or raw.

Layout: a big-endian header, then the values in row-major order::

    bytes 0-1   zero
    byte  2     data type (0x08 = unsigned byte, the only type MNIST uses)
    byte  3     number of dimensions d
    4 .. 4+4d   d sizes, big-endian uint32
    then        prod(sizes) values

so the magic number is 2051 (0x00000803) for image files (N, rows, cols) and 2049
(0x00000801) for label files (N,).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import BnlabError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# IDX type byte -> NumPy dtype (big-endian where it matters).
_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BnlabError(f"{path}: file not found") from None
    except OSError as exc:
        raise BnlabError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if raw[:2] != b"\x1f\x8b":  # not gzip: a raw IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise BnlabError(
            f"{path}: broken gzip stream ({exc}); the file is truncated or corrupted, "
            "delete it and download or copy it again"
        ) from None


def read_idx(path: str | os.PathLike[str], *, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into an array of its header's shape.

    Validates the magic number (and ``expect_magic`` when given: 2051 images, 2049
    labels), the dimension count, and that the payload holds exactly ``prod(dims)``
    values. Any problem raises :class:`BnlabError` naming the file and what is wrong.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise BnlabError(f"{p}: {len(data)} bytes, too short for an IDX header (4 bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or type_code not in _DTYPES or ndim == 0:
        raise BnlabError(
            f"{p}: bad IDX magic number {magic} (0x{magic:08x}); expected 2051 (images) or "
            "2049 (labels): this is not an IDX file"
        )
    if expect_magic is not None and magic != expect_magic:
        raise BnlabError(f"{p}: IDX magic number {magic}, expected {expect_magic}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BnlabError(f"{p}: truncated header: {ndim} dimensions need {header} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise BnlabError(
            f"{p}: {kind}: header says dims {tuple(dims)} ({expected} bytes of data), "
            f"the file holds {got}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
