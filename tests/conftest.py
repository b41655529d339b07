"""Shared test helpers. Each test module mirrors a module under src/bnlab/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bnlab.core as core


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


@pytest.fixture
def single_threaded() -> Iterator[None]:
    """One thread for torch and the core: the CI machine's 2 cores are shared."""
    torch_threads, core_threads = torch.get_num_threads(), core.get_num_threads()
    torch.set_num_threads(1)
    core.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        core.set_num_threads(core_threads)
