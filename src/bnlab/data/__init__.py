"""Datasets: MNIST and Fashion-MNIST (IDX files, verified download and cache) and digits.

``load_dataset(name, data_dir=None, *, download=True, progress=None) -> DatasetSplits``;
``DATASETS`` lists the names; ``read_idx(path)`` reads one IDX file. See
:mod:`bnlab.data.datasets` for where files are looked for.
"""

from bnlab.data.datasets import (
    DATASET_INFO,
    DATASETS,
    MIRRORS,
    SHA256,
    DatasetSplits,
    cache_dir,
    check_dataset_name,
    load_dataset,
    search_dirs,
)
from bnlab.data.download import download, sha256_file
from bnlab.data.idx import read_idx

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "MIRRORS",
    "SHA256",
    "DatasetSplits",
    "cache_dir",
    "check_dataset_name",
    "download",
    "load_dataset",
    "read_idx",
    "search_dirs",
    "sha256_file",
]
