"""Shared setup of the bnlab.port tests: the frameworks of the `port` extra, one thread each."""

from __future__ import annotations

import importlib.util
import os

import pytest

# XLA reads its flags when jax is first imported: one CPU thread (the CI machine is shared).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")
os.environ.setdefault("KERAS_BACKEND", "jax")

PORT_MODULES = ("jax", "flax", "keras", "onnx", "onnxruntime")
MISSING = [m for m in PORT_MODULES if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _port_extra() -> None:
    """Skip (with the reason) when the extra is absent; CI installs it, so there it fails."""
    if not MISSING:
        return
    msg = f"the port extra is not installed ({', '.join(MISSING)}): pip install 'bnlab[port]'"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the port tests: {msg}")
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def _port_threads(single_threaded: None) -> None:
    """torch and the core on one thread for every port test."""
