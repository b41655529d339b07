"""The IDX reader: valid files (gzip and raw) and every way a file can be broken."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bnlab.data import read_idx
from bnlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from bnlab.errors import BnlabError

IMAGES = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
LABELS = np.array([7, 0, 9], dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_reads_images_and_labels(tmp_path: Path, compress: bool, idx_bytes, write_idx) -> None:
    img = write_idx(tmp_path / "img", idx_bytes(IMAGES), compress=compress)
    lab = write_idx(tmp_path / "lab", idx_bytes(LABELS), compress=compress)
    got_img = read_idx(img, expect_magic=IMAGES_MAGIC)
    got_lab = read_idx(lab, expect_magic=LABELS_MAGIC)
    assert got_img.dtype == np.uint8 and got_img.shape == (3, 4, 5)
    np.testing.assert_array_equal(got_img, IMAGES)
    np.testing.assert_array_equal(got_lab, LABELS)


def test_header_magic_numbers_are_mnists(idx_bytes) -> None:
    assert idx_bytes(IMAGES)[:4] == (2051).to_bytes(4, "big")
    assert idx_bytes(LABELS)[:4] == (2049).to_bytes(4, "big")


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_truncated_payload_names_the_file(
    tmp_path: Path, compress: bool, idx_bytes, write_idx
) -> None:
    path = write_idx(tmp_path / "trunc", idx_bytes(IMAGES)[:-7], compress=compress)
    with pytest.raises(BnlabError, match=r"trunc.*truncated.*\(3, 4, 5\).*60 bytes.*53"):
        read_idx(path)


def test_trailing_bytes_rejected(tmp_path: Path, idx_bytes, write_idx) -> None:
    path = write_idx(tmp_path / "long", idx_bytes(LABELS) + b"\0", compress=False)
    with pytest.raises(BnlabError, match="trailing bytes"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path: Path, idx_bytes, write_idx) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(IMAGES))[:-12])
    with pytest.raises(BnlabError, match=r"cut\.gz.*broken gzip"):
        read_idx(path)


def test_wrong_magic(tmp_path: Path, idx_bytes, write_idx) -> None:
    path = write_idx(tmp_path / "bad", b"\x12\x34\x08\x01" + bytes(8), compress=False)
    with pytest.raises(BnlabError, match=r"bad.*magic number.*expected 2051.*2049"):
        read_idx(path)


def test_labels_file_where_images_expected(tmp_path: Path, idx_bytes, write_idx) -> None:
    path = write_idx(tmp_path / "labels", idx_bytes(LABELS), compress=True)
    with pytest.raises(BnlabError, match="magic number 2049, expected 2051"):
        read_idx(path, expect_magic=IMAGES_MAGIC)


def test_wrong_dims_images_with_two_dims(tmp_path: Path, idx_bytes, write_idx) -> None:
    # A (3, 20) array is a valid IDX file but not an image file: magic 2050.
    path = write_idx(tmp_path / "flat", idx_bytes(IMAGES.reshape(3, 20)), compress=False)
    assert read_idx(path).shape == (3, 20)
    with pytest.raises(BnlabError, match="magic number 2050, expected 2051"):
        read_idx(path, expect_magic=IMAGES_MAGIC)


def test_dims_larger_than_payload(tmp_path: Path, idx_bytes, write_idx) -> None:
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
    path = write_idx(tmp_path / "big", header + bytes(100), compress=False)
    with pytest.raises(BnlabError, match=r"truncated.*\(10, 28, 28\)"):
        read_idx(path)


def test_short_and_missing_files(tmp_path: Path, idx_bytes, write_idx) -> None:
    short = write_idx(tmp_path / "short", b"\0\0", compress=False)
    with pytest.raises(BnlabError, match="too short"):
        read_idx(short)
    with pytest.raises(BnlabError, match="not found"):
        read_idx(tmp_path / "nope")
