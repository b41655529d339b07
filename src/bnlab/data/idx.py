"""The IDX file format of MNIST and Fashion-MNIST, gzip-compressed or raw.

Layout: a big-endian header, then the values in row-major order::

    bytes 0-1   zero
    byte  2     data type (0x08 = unsigned byte, the only type MNIST uses)
    byte  3     number of dimensions d
    4 .. 4+4d   d sizes, big-endian uint32
    then        prod(sizes) values

so the magic number is 2051 (0x00000803) for image files (N, rows, cols) and 2049
(0x00000801) for label files (N,).

Nothing a file claims is trusted before it is checked: the header is read first, and the
payload size it implies (computed in Python integers, so dimensions cannot overflow) must
fit ``max_bytes`` and what the file can hold (exactly its size for a raw file; at most
:data:`_MAX_GZIP_RATIO` times its size for gzip, deflate's limit) before any of the body
is read. Decompression then reads exactly that many bytes, plus one to detect trailing
data, so a gzip bomb is never inflated beyond what the header announced.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import IO

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
_MAX_NDIM = 32
# Deflate cannot compress better than about 1032:1; a header claiming more data than that
# ratio allows cannot be honest. Kept a little above, for the gzip header and trailer.
_MAX_GZIP_RATIO = 1100
_CHUNK = 1 << 20


def _broken_gzip(path: Path, exc: BaseException) -> BnlabError:
    return BnlabError(
        f"{path}: broken gzip stream ({exc}); the file is truncated or corrupted, "
        "delete it and download or copy it again"
    )


def _read_exact(fh: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        part = fh.read(min(n - got, _CHUNK))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_idx(path: str | os.PathLike[str], *, expect_magic: int | None = None,
             max_bytes: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into an array of its header's shape.

    Validates the magic number (and ``expect_magic`` when given: 2051 images, 2049
    labels), the dimension count, and that the payload holds exactly ``prod(dims)``
    values. ``max_bytes`` caps the payload the header may announce. Any problem raises
    :class:`BnlabError` naming the file and what is wrong, before the body is read when
    the header alone shows it.
    """
    p = Path(path)
    try:
        with open(p, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            fh: IO[bytes] = (gzip.GzipFile(fileobj=raw) if compressed  # type: ignore[assignment]
                             else raw)
            capacity = file_size * _MAX_GZIP_RATIO if compressed else file_size
            try:
                return _read(p, fh, expect_magic, max_bytes, compressed, capacity)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise _broken_gzip(p, exc) from None
    except FileNotFoundError:
        raise BnlabError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise BnlabError(f"{p}: is a folder, expected an IDX file") from None
    except OSError as exc:
        raise BnlabError(f"{p}: cannot read the file ({exc.strerror or exc})") from None


def _read(p: Path, fh: IO[bytes], expect_magic: int | None, max_bytes: int | None,
          compressed: bool, capacity: int) -> np.ndarray:
    head = _read_exact(fh, 4)
    if len(head) < 4:
        raise BnlabError(f"{p}: {len(head)} bytes, too short for an IDX header (4 bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    magic = struct.unpack(">I", head)[0]
    if zero != 0 or type_code not in _DTYPES or ndim == 0:
        raise BnlabError(
            f"{p}: bad IDX magic number {magic} (0x{magic:08x}); expected 2051 (images) or "
            "2049 (labels): this is not an IDX file"
        )
    if expect_magic is not None and magic != expect_magic:
        raise BnlabError(f"{p}: IDX magic number {magic}, expected {expect_magic}")
    if ndim > _MAX_NDIM:
        raise BnlabError(f"{p}: IDX header declares {ndim} dimensions, at most {_MAX_NDIM} "
                         "are supported")
    header = 4 + 4 * ndim
    dims_raw = _read_exact(fh, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise BnlabError(f"{p}: truncated header: {ndim} dimensions need {header} bytes")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    dtype = np.dtype(_DTYPES[type_code])
    expected = dtype.itemsize
    for d in dims:  # Python integers: no overflow, whatever the header says
        expected *= d
    if max_bytes is not None and expected > max_bytes:
        raise BnlabError(
            f"{p}: header says dims {tuple(dims)} ({expected} bytes of data), more than the "
            f"{max_bytes} bytes expected for this file; refused before reading it"
        )
    if compressed and expected > capacity:
        raise BnlabError(
            f"{p}: header says dims {tuple(dims)} ({expected} bytes of data), more than a "
            f"{capacity // _MAX_GZIP_RATIO}-byte gzip file can hold; refused before "
            "decompressing it"
        )
    if not compressed and expected != capacity - header:
        got = capacity - header
        kind = "truncated" if got < expected else "has trailing bytes"
        raise BnlabError(
            f"{p}: {kind}: header says dims {tuple(dims)} ({expected} bytes of data), "
            f"the file holds {got}"
        )
    # One byte more than announced: trailing data shows, and nothing beyond is inflated.
    body = bytearray(expected + 1)
    view, got = memoryview(body), 0
    while got < len(body):
        n = fh.readinto(view[got:got + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        held = str(got) if got < expected else "more"
        raise BnlabError(
            f"{p}: {kind}: header says dims {tuple(dims)} ({expected} bytes of data), "
            f"the file holds {held}"
        )
    return np.frombuffer(body, dtype=dtype, count=expected // dtype.itemsize).reshape(dims)
