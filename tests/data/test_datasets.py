"""load_dataset: lookup order, normalisation, validation across files, digits, real MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import DATASETS, cache_dir, load_dataset
from bnlab.errors import BnlabError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BNLAB_MIRRORS", "http://127.0.0.1:9/")


def test_tiny_mnist_normalised_with_train_stats(make_mnist_dir) -> None:
    root, arrays = make_mnist_dir()
    data = load_dataset("mnist", root, download=False)
    tr = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    te = arrays["t10k-images-idx3-ubyte"].astype(np.float64) / 255
    assert data.mean == pytest.approx(tr.mean(), abs=1e-12)
    assert data.std == pytest.approx(tr.std(), abs=1e-12)
    x, y = data.train.tensors
    assert x.dtype == torch.float32 and x.shape == (12, 1, 6, 6)
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy(), (tr - tr.mean()) / tr.std(), atol=1e-6)
    np.testing.assert_allclose(data.test.tensors[0][:, 0].numpy(),
                               (te - tr.mean()) / tr.std(), atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    assert data.in_shape == (1, 6, 6) and data.num_classes == 10
    assert data.source == str(root / "mnist")


def test_lookup_order(make_mnist_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, _ = make_mnist_dir("explicit", seed=1)
    env, _ = make_mnist_dir("env", seed=2)
    monkeypatch.setenv("BNLAB_DATA_DIR", str(env))
    assert load_dataset("mnist", explicit, download=False).source == str(explicit / "mnist")
    assert load_dataset("mnist", download=False).source == str(env / "mnist")
    # data_dir without the files: falls through to $BNLAB_DATA_DIR
    assert load_dataset("mnist", explicit / "empty", download=False).source == str(
        env / "mnist")
    monkeypatch.delenv("BNLAB_DATA_DIR")
    assert cache_dir().parent.name == "xdg"  # XDG_CACHE_HOME respected
    with pytest.raises(BnlabError, match="not found"):
        load_dataset("mnist", download=False)


def test_label_count_mismatch(make_mnist_dir, idx_bytes, write_idx) -> None:
    root, _ = make_mnist_dir()
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)),
              compress=False)
    with pytest.raises(BnlabError, match=r"5 images but .*t10k-labels.* 4 labels"):
        load_dataset("mnist", root, download=False)


def test_label_out_of_range(make_mnist_dir, idx_bytes, write_idx) -> None:
    root, _ = make_mnist_dir()
    write_idx(root / "mnist" / "train-labels-idx1-ubyte",
              idx_bytes(np.full(12, 10, np.uint8)), compress=False)
    with pytest.raises(BnlabError, match="label 10 out of range"):
        load_dataset("mnist", root, download=False)


def test_unknown_dataset_lists_valid() -> None:
    with pytest.raises(BnlabError, match=r"unknown dataset 'cifar'.*mnist, fashion-mnist, digits"):
        load_dataset("cifar")
    assert DATASETS == ("mnist", "fashion-mnist", "digits")


def test_digits_offline_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) == 1437 and len(a.test) == 360
    assert a.in_shape == (1, 8, 8)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    x = a.train.tensors[0].double()
    assert abs(float(x.mean())) < 1e-6 and float(x.std(unbiased=False)) == pytest.approx(1, 1e-6)
    assert set(a.test.tensors[1].tolist()) == set(range(10))
