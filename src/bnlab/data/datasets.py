"""MNIST, Fashion-MNIST (IDX files: found locally or downloaded) and scikit-learn's digits.

Where the IDX files are looked for, in order:

1. ``data_dir`` (the CLI's ``--data-dir``),
2. ``$BNLAB_DATA_DIR``,
3. the user cache, ``$XDG_CACHE_HOME/bnlab`` (default ``~/.cache/bnlab``).

Each holds ``mnist/`` and ``fashion-mnist/`` with the four original file names
(``train-images-idx3-ubyte.gz`` …; the uncompressed names without ``.gz`` work too).
If a dataset is in none of them, it is downloaded (mirrors tried in order, SHA-256
verified) into ``data_dir`` if given, else the user cache.

Every split is returned as float32 images (N, 1, H, W), normalised with the *training*
split's mean and standard deviation (one scalar each, over all pixels), and int64 labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bnlab._io import remove_stale_temps
from bnlab.data.download import (
    MIRRORS_ENV,
    check_mirrors,
    download,
    env_mirrors,
    sha256_file,
)
from bnlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from bnlab.errors import BnlabError

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")

# (train images, train labels, test images, test labels)
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# Sizes in bytes of the published files: a download may not send more.
SIZES: dict[str, dict[str, int]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": 9912422,
        "train-labels-idx1-ubyte.gz": 28881,
        "t10k-images-idx3-ubyte.gz": 1648877,
        "t10k-labels-idx1-ubyte.gz": 4542,
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": 26421880,
        "train-labels-idx1-ubyte.gz": 29515,
        "t10k-images-idx3-ubyte.gz": 4422102,
        "t10k-labels-idx1-ubyte.gz": 5148,
    },
}

# The payload (bytes after the header) of each file: 60,000 / 10,000 images of 28x28 and
# their labels. A header may announce less (a subset), never more.
PAYLOAD_BYTES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 60000 * 28 * 28,
    "train-labels-idx1-ubyte.gz": 60000,
    "t10k-images-idx3-ubyte.gz": 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte.gz": 10000,
}

# The datasets' usual public mirrors, tried in order ($BNLAB_MIRRORS replaces them).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "https://storage.googleapis.com/cvdf-datasets/mnist",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion",
    ),
}

# name -> (in_shape, num_classes), known without loading anything.
DATASET_INFO: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
}

DIGITS_TEST_SIZE = 360


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits as in-memory tensors.

    ``train``/``test`` are ``TensorDataset(x, y)``: x float32 (N, C, H, W), normalised as
    ``(pixel - mean) / std`` with the training split's ``mean``/``std`` (pixel values in
    [0, 1]); y int64 class indices. ``source`` says where the data came from.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    source: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: float
    std: float


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise BnlabError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/bnlab``, else ``~/.cache/bnlab``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bnlab"


def search_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for a dataset's files, in order (see the module docstring)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("BNLAB_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_dir())
    return dirs


def _find_files(root: Path, name: str) -> list[Path] | None:
    """The four files of ``name`` under ``root/name`` (``.gz`` or raw), or None."""
    found = []
    for fname in IDX_FILES:
        gz = root / name / fname
        raw = gz.with_suffix("")
        if gz.is_file():
            found.append(gz)
        elif raw.is_file():
            found.append(raw)
        else:
            return None
    return found


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False  # the IDX reader reports why it cannot be read


def _verify(path: Path, name: str) -> None:
    """A ``.gz`` file with an original name must have the published SHA-256; so must
    gzip data under an uncompressed name (a renamed original; size checked first)."""
    gz_name = path.name if path.suffix == ".gz" else path.name + ".gz"
    if path.suffix != ".gz":
        if not _is_gzip(path):
            return  # uncompressed copies: the IDX reader checks header and size
        if path.stat().st_size != SIZES[name][gz_name]:
            raise BnlabError(
                f"{path}: gzip-compressed data under an uncompressed name, and not the "
                f"published {gz_name} ({path.stat().st_size} bytes, expected "
                f"{SIZES[name][gz_name]}); expected the uncompressed IDX file or the "
                f"original {gz_name}"
            )
    expected = SHA256[name][gz_name]
    got = sha256_file(path)
    if got != expected:
        raise BnlabError(
            f"{path}: SHA-256 mismatch (got {got}, expected {expected}); the file is "
            "corrupted or truncated: delete it and copy or download it again"
        )


def _normalise(x: np.ndarray, scale: float, n_train: int) -> tuple[torch.Tensor, float, float]:
    """Scale to [0, 1] then standardise with the first ``n_train`` rows' mean and std.

    The statistics come from a histogram of the integer pixel values, in float64, so they
    are exact (summing 47M float32 values naively loses digits); each pixel is then
    mapped through a 256-entry lookup table (one gather, much faster than float math).
    """
    values = np.arange(256, dtype=np.float64) / scale
    counts = np.bincount(x[:n_train].ravel(), minlength=256).astype(np.float64)
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
    lut = ((values - mean) / std).astype(np.float32)
    return torch.from_numpy(lut[x]).unsqueeze(1), mean, std


def _load_idx_dataset(name: str, files: list[Path], source: str) -> DatasetSplits:
    for f in files:
        _verify(f, name)
    tr_x, tr_y, te_x, te_y = (
        read_idx(f, expect_magic=magic, max_bytes=PAYLOAD_BYTES[fname])
        for f, fname, magic in zip(files, IDX_FILES, (IMAGES_MAGIC, LABELS_MAGIC) * 2,
                                   strict=True)
    )
    for xs, ys, fx, fy in ((tr_x, tr_y, files[0], files[1]), (te_x, te_y, files[2], files[3])):
        if xs.ndim != 3 or xs.dtype != np.uint8:
            raise BnlabError(f"{fx}: expected uint8 images (N, rows, cols), got {xs.shape}")
        if ys.ndim != 1 or ys.dtype != np.uint8:
            raise BnlabError(f"{fy}: expected uint8 labels (N,), got {ys.shape}")
        if len(xs) != len(ys):
            raise BnlabError(f"{fx} holds {len(xs)} images but {fy} holds {len(ys)} labels")
        if ys.size and ys.max() >= 10:
            raise BnlabError(f"{fy}: label {int(ys.max())} out of range 0-9")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise BnlabError(
            f"train images are {tr_x.shape[1:]} but test images are {te_x.shape[1:]}"
        )
    x, mean, std = _normalise(np.concatenate([tr_x, te_x]), 255.0, len(tr_x))
    y = torch.from_numpy(np.concatenate([tr_y, te_y]).astype(np.int64))
    n = len(tr_x)
    h, w = tr_x.shape[1:]
    return DatasetSplits(
        name=name,
        train=TensorDataset(x[:n], y[:n]),
        test=TensorDataset(x[n:], y[n:]),
        source=source,
        in_shape=(1, int(h), int(w)),
        num_classes=10,
        mean=mean,
        std=std,
    )


def load_digits_splits() -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0-16), no network.

    Split deterministically: a fixed permutation (NumPy seed 0), the last 360 images are
    the test split, the first 1,437 the training split.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)  # integer values 0-16
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.RandomState(0).permutation(len(images))
    images, labels = images[order], labels[order]
    n = len(images) - DIGITS_TEST_SIZE
    x, mean, std = _normalise(images, 16.0, n)
    y = torch.from_numpy(labels)
    return DatasetSplits(
        name="digits",
        train=TensorDataset(x[:n], y[:n]),
        test=TensorDataset(x[n:], y[n:]),
        source="scikit-learn load_digits (bundled)",
        in_shape=(1, 8, 8),
        num_classes=10,
        mean=mean,
        std=std,
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool | None = None,
    mirrors: Sequence[str] | None = None,
) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`): look locally, else download, else explain.

    ``mirrors`` (base URLs) replace the built-in ones (also settable as ``$BNLAB_MIRRORS``).
    Raises :class:`BnlabError` for an unknown name, missing data that cannot be
    downloaded (saying where it looked and how to supply the files), or a corrupted file.
    """
    check_dataset_name(name)
    if name == "digits":
        return load_digits_splits()
    dirs = search_dirs(data_dir)
    for root in dirs:
        files = _find_files(root, name)
        if files is not None:
            return _load_idx_dataset(name, files, str(root / name))
    looked = ", ".join(f"{d / name}/" for d in dirs)
    how = (
        f"put the four files ({', '.join(IDX_FILES)}) in DIR/{name}/ and pass "
        "--data-dir DIR or set BNLAB_DATA_DIR=DIR"
    )
    if not download:
        raise BnlabError(f"{name} not found (looked in {looked}); {how}.")
    env = env_mirrors()
    urls = list(mirrors) if mirrors is not None else env if env is not None else list(
        MIRRORS[name])
    if not urls:
        why = f"${MIRRORS_ENV} is set but empty" if mirrors is None else "mirrors=[] given"
        raise BnlabError(f"{name} not found (looked in {looked}), and {why}: no mirrors, so "
                         f"offline, nothing downloaded; {how}.")
    check_mirrors(urls)
    target = (Path(data_dir).expanduser() if data_dir is not None else cache_dir()) / name
    remove_stale_temps(target)  # partial downloads of killed processes
    created = not target.exists()
    try:
        for fname in IDX_FILES:
            if not (target / fname).is_file():
                _fetch_one(fname, target, name, urls, progress)
    except BnlabError as exc:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # leave no empty folder behind (files that did arrive are kept)
        raise BnlabError(
            f"{name} not found (looked in {looked}) and the download failed: {exc}; "
            f"{how}, or let bnlab download them when online."
        ) from None
    files = _find_files(target.parent, name)
    if files is None:  # pragma: no cover - every file was just written
        raise BnlabError(f"{target}: files missing after download")
    return _load_idx_dataset(name, files, f"downloaded to {target}")


def _fetch_one(
    fname: str, target: Path, name: str, urls: list[str], progress: bool | None
) -> None:
    try:
        download(fname, target / fname, SHA256[name][fname], urls, size=SIZES[name][fname],
                 progress=progress)
    except OSError as exc:
        raise BnlabError(f"cannot write {target / fname}: {exc}") from None
