"""One thread for torch and the core in these tests: the CI machine's 2 cores are shared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import bnlab.core as core


@pytest.fixture(autouse=True)
def _single_threaded() -> Iterator[None]:
    torch_threads, core_threads = torch.get_num_threads(), core.get_num_threads()
    torch.set_num_threads(1)
    core.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        core.set_num_threads(core_threads)
