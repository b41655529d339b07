"""The real MNIST files (BNLAB_DATA_DIR): shapes, statistics, labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.data import load_dataset


def test_real_mnist(mnist_dir: Path) -> None:
    data = load_dataset("mnist", mnist_dir, download=False)
    assert data.train.tensors[0].shape == (60000, 1, 28, 28)
    assert data.test.tensors[0].shape == (10000, 1, 28, 28)
    # The well-known MNIST pixel statistics (0.1307, 0.3081).
    assert data.mean == pytest.approx(0.1307, abs=1e-4)
    assert data.std == pytest.approx(0.3081, abs=1e-4)
    counts = torch.bincount(data.train.tensors[1], minlength=10)
    assert counts.tolist()[:2] == [5923, 6742]
