"""Helpers for the data tests: write tiny IDX files (and MNIST-style folders) by hand, and
serve files from a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import http.server
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file for a uint8 array: header (magic, dims) then the values."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | a.ndim
    return struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _write_idx(path: Path, data: bytes, *, compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _tiny_mnist(n_train: int = 12, n_test: int = 5, hw: int = 6, seed: int = 0) -> dict:
    """Random images/labels for the four MNIST files (uncompressed names)."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


@pytest.fixture
def make_mnist_dir(tmp_path: Path) -> Callable[..., tuple[Path, dict]]:
    """``make(root_name, **tiny_mnist_kwargs) -> (root, arrays)``: root/mnist/ raw IDX files."""

    def make(root_name: str = "data", **kwargs: int) -> tuple[Path, dict]:
        root = tmp_path / root_name
        arrays = _tiny_mnist(**kwargs)
        for name, a in arrays.items():
            _write_idx(root / "mnist" / name, _idx_bytes(a), compress=False)
        return root, arrays

    return make


@pytest.fixture
def idx_bytes() -> Callable[..., bytes]:
    """``idx_bytes(array, magic=None)``: the bytes of an IDX file holding ``array``."""
    return _idx_bytes


@pytest.fixture
def write_idx() -> Callable[..., Path]:
    """``write_idx(path, data, compress=bool)``: write IDX bytes, gzip-compressed or raw."""
    return _write_idx


@pytest.fixture
def local_server() -> Iterator[Callable[..., http.server.ThreadingHTTPServer]]:
    """``local_server(Handler, **attrs)``: a threaded HTTP server on 127.0.0.1 (a free
    port) with ``attrs`` set on it, serving until the test ends."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handler: type, **attrs: object) -> http.server.ThreadingHTTPServer:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for name, value in attrs.items():
            setattr(srv, name, value)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
