"""Hostile servers and files: a 127.0.0.1 mirror that floods, lies about its length and
trickles; IDX files whose headers lie and gzip bombs; an offline setting that must not
touch the network. Each case is bounded in time, bytes and memory."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from bnlab.data import download, load_dataset, read_idx
from bnlab.data.datasets import SIZES
from bnlab.data.download import DEADLINE_ENV, check_mirrors, env_deadline_s
from bnlab.errors import BnlabError

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
GOOD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FLOOD_CAP = 256 << 20  # what the flooding handlers would send at most: 256 MiB
MiB = 1 << 20


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/flood/F: no Content-Length, then bytes until the client hangs up (at most FLOOD_CAP);
    /liar/F: announces 512 MiB and starts sending it; /trickle/F: honest headers, then one
    byte every 0.2 s; /slowhead/F: the status line one byte every 0.2 s. Bytes sent and
    time spent per request are recorded on the server."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        kind = self.path.strip("/").partition("/")[0]
        sent = 0
        try:
            if kind == "slowhead":
                for b in b"HTTP/1.1 200 OK\r\n":
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.2)
                return
            self.send_response(200)
            if kind == "liar":
                self.send_header("Content-Length", str(512 * MiB))
            elif kind == "trickle":
                self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            if kind == "trickle":
                for i in range(100):  # 20 s at most, however the client behaves
                    self.wfile.write(PAYLOAD[i:i + 1])
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.2)
                return
            chunk = bytes(64 << 10)
            while sent < FLOOD_CAP:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client cut us off: what the tests want
            pass
        finally:
            self.server.sent.append(sent)  # type: ignore[attr-defined]
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile(local_server) -> http.server.ThreadingHTTPServer:
    return local_server(_Hostile, sent=[], daemon_threads=True)


def _url(srv: http.server.ThreadingHTTPServer, kind: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{kind}"


def _wait_sent(srv: http.server.ThreadingHTTPServer) -> int:
    """Bytes the (single) handler sent, once it has noticed the client is gone."""
    for _ in range(200):
        if srv.sent:  # type: ignore[attr-defined]
            return int(srv.sent[0])  # type: ignore[attr-defined]
        time.sleep(0.05)
    raise AssertionError("the handler never finished")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("kind", ["liar", "flood"])
def test_body_larger_than_the_expected_size_is_refused_at_once(hostile, tmp_path: Path,
                                                                kind: str) -> None:
    """A server announcing (liar) or sending (flood) 512 MiB / 256 MiB for a 100 KB file:
    refused on the header, or cut off once the body passes the size; nothing kept."""
    dest = tmp_path / "d" / "file.bin"
    t0 = time.monotonic()
    with pytest.raises(BnlabError) as info:
        download("file.bin", dest, GOOD_SHA, [_url(hostile, kind)], size=len(PAYLOAD),
                 progress=False)
    elapsed = time.monotonic() - t0
    expected = {"liar": f"announces {512 * MiB} bytes, expected {len(PAYLOAD)}",
                "flood": f"grew past the expected {len(PAYLOAD)} bytes"}[kind]
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert _listing(dest.parent) == []  # no partial file either
    assert elapsed < 10, elapsed
    # the client hung up long before the server was done (socket buffers aside)
    assert _wait_sent(hostile) < 32 * MiB


@pytest.mark.parametrize("kind", ["trickle", "slowhead"])
def test_trickling_server_is_cut_off_by_the_deadline(hostile, tmp_path: Path, kind: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One byte every 0.2 s never trips the 30 s socket timeout; the per-file deadline
    ($BNLAB_DOWNLOAD_DEADLINE_S) cuts it off, in the body or in the headers."""
    monkeypatch.setenv(DEADLINE_ENV, "1.0")
    dest = tmp_path / "file.bin"
    t0 = time.monotonic()
    with pytest.raises(BnlabError, match=rf"deadline of 1 s \(\${DEADLINE_ENV}\)"):
        download("file.bin", dest, GOOD_SHA, [_url(hostile, kind)], size=len(PAYLOAD),
                 progress=False)
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 5.0, elapsed  # cut off near 1 s, not after 20 s of trickle
    assert _listing(tmp_path) == []


def test_deadline_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    assert env_deadline_s() == 600.0
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(DEADLINE_ENV, bad)
        with pytest.raises(BnlabError, match=rf"\${DEADLINE_ENV} must be a positive number"):
            env_deadline_s()


@pytest.mark.parametrize("mirror", ["ftp://example.org/mnist", "file:///etc", "example.org",
                                    "http://", "javascript:alert(1)"])
def test_mirror_that_is_not_http_is_refused_by_name(mirror: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BnlabError, match="is not an http:// or https:// URL") as info:
        check_mirrors(["http://127.0.0.1:9/ok", mirror])
    assert repr(mirror) in str(info.value)
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BNLAB_MIRRORS", mirror)
    with pytest.raises(BnlabError, match="is not an http:// or https:// URL"):
        load_dataset("mnist", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_empty_mirrors_means_offline_and_no_connection(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """BNLAB_MIRRORS='' used to fall back to the public mirrors; now not a single socket
    connects (the guard fails the test if one tries)."""
    attempts: list[object] = []

    def guard(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for empty in ("", "  ", ","):
        monkeypatch.setenv("BNLAB_MIRRORS", empty)
        with pytest.raises(BnlabError) as info:
            load_dataset("mnist", tmp_path / "data", progress=False)
        msg = str(info.value)
        assert "$BNLAB_MIRRORS is set but empty" in msg and "offline" in msg
        assert "\n" not in msg
    with pytest.raises(BnlabError, match=r"mirrors=\[\] given: no mirrors, so offline"):
        load_dataset("fashion-mnist", tmp_path / "data", progress=False, mirrors=[])
    assert attempts == []
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_partial_download_of_a_killed_process_is_removed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A temp file named like ours, of a PID that is gone, is removed on the next run of
    that folder; a live process's temp file is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "data" / "mnist"
    target.mkdir(parents=True)
    stale = target / f".train-images-idx3-ubyte.gz.{dead.pid}.abcd_123.tmp"
    live = target / f".train-images-idx3-ubyte.gz.{os.getpid()}.zyxw_987.tmp"
    other = target / ".notes.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("BNLAB_MIRRORS", "http://127.0.0.1:9/")  # refused at once
    with pytest.raises(BnlabError, match="download failed"):
        load_dataset("mnist", tmp_path / "data", progress=False)
    assert not stale.exists() and live.exists() and other.exists()


# --------------------------------------------------------------------------- IDX files

# read_idx on argv[1], in a process that loads the IDX module alone (NumPy, no torch), so
# that the peak is the reader's; it prints the outcome and its RSS before reading.
_MEASURE = textwrap.dedent(
    """
    import importlib.util, resource, sys
    import bnlab.errors, numpy
    spec = importlib.util.spec_from_file_location("idx_alone", sys.argv[2])
    idx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(idx)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    try:
        idx.read_idx(sys.argv[1])
        print("read")
    except bnlab.errors.BnlabError as exc:
        print("refused:", exc)
    """
)
# Started from a small parent: a child forked straight from pytest would count pytest's
# (torch-sized) pages in its own ru_maxrss. The parent reports its child's peak.
_PARENT = textwrap.dedent(
    """
    import resource, subprocess, sys
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True)
    print(proc.stdout.strip())
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    """
)


def _peak(path: Path) -> tuple[str, int, int]:
    """(outcome, RSS before reading, peak RSS) in bytes of read_idx(path), measured with
    resource.getrusage in a fresh process."""
    import bnlab.data.idx

    proc = subprocess.run([sys.executable, "-c", _PARENT, sys.executable, "-c", _MEASURE,
                           str(path), bnlab.data.idx.__file__],
                          capture_output=True, text=True, timeout=120, check=True)
    before, outcome, peak = proc.stdout.strip().split("\n")
    return outcome, int(before), int(peak)


def _gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9)


MNIST_TRAIN_HEADER = struct.pack(">IIII", 2051, 60000, 28, 28)
N_TRAIN_BYTES = 60000 * 28 * 28


def test_gzip_bomb_is_never_inflated_past_its_header(tmp_path: Path) -> None:
    """A 4.4 MB gzip file with an honest-looking train-images header and 4.3 GB of zeros
    behind it (gzip members, so it is built in no time): read_idx stops one byte after
    the 47 MB the header announced. Peak memory: that of reading a legitimate file with
    the same header, not of the inflated size."""
    zeros = _gzip_member(bytes(16 * MiB))
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with open(bomb, "wb") as fh:
        fh.write(_gzip_member(MNIST_TRAIN_HEADER + bytes(N_TRAIN_BYTES)))
        for _ in range(256):  # 256 x 16 MiB = 4 GiB more when inflated
            fh.write(zeros)
    legit = tmp_path / "legit-idx3-ubyte.gz"
    legit.write_bytes(_gzip_member(MNIST_TRAIN_HEADER + bytes(N_TRAIN_BYTES)))
    assert bomb.stat().st_size < 8 * MiB
    bomb_out, bomb_base, bomb_peak = _peak(bomb)
    legit_out, legit_base, legit_peak = _peak(legit)
    assert bomb_out.startswith("refused:") and "has trailing bytes" in bomb_out
    assert legit_out == "read"
    bomb_extra, legit_extra = bomb_peak - bomb_base, legit_peak - legit_base
    print(f"peak RSS: bomb {bomb_peak / MiB:.0f} MiB (+{bomb_extra / MiB:.0f} MiB reading), "
          f"legit {legit_peak / MiB:.0f} MiB (+{legit_extra / MiB:.0f} MiB reading)")
    assert bomb_peak < 1024 * MiB
    assert legit_extra > N_TRAIN_BYTES  # the measurement sees the array itself
    assert bomb_extra < 1.25 * legit_extra + 8 * MiB


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_header_whose_dimensions_overflow_int64_is_refused_before_reading(
    tmp_path: Path, compress: bool
) -> None:
    """(2^32-1)^3 bytes do not fit int64 (NumPy's reshape traceback before); the header is
    compared with what the file can hold, in Python integers, and refused."""
    big = 2**32 - 1
    data = struct.pack(">IIII", 2051, big, big, big) + bytes(1000)
    path = tmp_path / ("huge.gz" if compress else "huge")
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(BnlabError, match=rf"dims \({big}, {big}, {big}\) \({big**3} bytes"):
        read_idx(path)
    with pytest.raises(BnlabError, match=r"more than the 47040000 bytes expected"):
        read_idx(path, max_bytes=N_TRAIN_BYTES)


def test_too_many_dimensions_refused(tmp_path: Path) -> None:
    path = tmp_path / "dims"
    path.write_bytes(struct.pack(">I", 0x0800 | 200) + bytes(4 * 200))
    with pytest.raises(BnlabError, match="declares 200 dimensions, at most 32"):
        read_idx(path)


def test_header_beyond_what_a_gzip_file_can_hold_is_refused_before_inflating(
    tmp_path: Path
) -> None:
    """Deflate cannot exceed about 1032:1, so a 1 KB gzip claiming 47 MB is a lie."""
    path = tmp_path / "small.gz"
    path.write_bytes(gzip.compress(MNIST_TRAIN_HEADER + bytes(1000)))
    with pytest.raises(BnlabError, match=r"more than a \d+-byte gzip file can hold"):
        read_idx(path)


def test_gzip_under_an_uncompressed_name_is_checked_first(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A gzip file saved as train-images-idx3-ubyte (no .gz) used to skip the checksum and
    be inflated whole: now it must be the published .gz (size, then SHA-256)."""
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    bomb = zlib.compress(b"")  # any gzip bytes of the wrong size will do
    (root / "mnist" / names[0]).write_bytes(gzip.compress(MNIST_TRAIN_HEADER) + bomb)
    for n in names[1:]:
        (root / "mnist" / n).write_bytes(struct.pack(">II", 2049, 0))
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    with pytest.raises(BnlabError, match=r"gzip-compressed data under an uncompressed name, "
                       rf"and not the published train-images-idx3-ubyte\.gz .*expected "
                       rf"{SIZES['mnist']['train-images-idx3-ubyte.gz']}"):
        load_dataset("mnist", root, download=False)
