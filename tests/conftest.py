"""Shared test helpers. Each test module mirrors a module under src/bnlab/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path | None:
    """The real MNIST / Fashion-MNIST folder (``$BNLAB_DATA_DIR``), if it is there."""
    env = os.environ.get("BNLAB_DATA_DIR")
    if env and (Path(env) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        return Path(env)
    return None


@pytest.fixture
def mnist_dir() -> Path:
    """The real data dir; tests needing it skip with a reason when it is absent."""
    d = shared_data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the MNIST tests: set BNLAB_DATA_DIR to the shared datasets")
        pytest.skip("MNIST files not found: set BNLAB_DATA_DIR to a folder with mnist/")
    return d
