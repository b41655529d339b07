"""The download path over real HTTP: a server on 127.0.0.1 serving good, corrupted and
truncated files, and one handler that drops the connection mid-body. No mocking."""

from __future__ import annotations

import hashlib
import http.server
import shutil
from pathlib import Path

import pytest

from bnlab.data import SHA256, download, load_dataset
from bnlab.errors import BnlabError

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
GOOD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good/F, /corrupt/F (one byte flipped), /truncated/F (short, honest length),
    /drop/F (announces the full length, sends half, closes), /real/F (files from
    ``server.real_dir``), anything else 404."""

    def do_GET(self) -> None:
        kind, _, name = self.path.strip("/").partition("/")
        body = PAYLOAD
        if kind == "real":
            path = self.server.real_dir / name  # type: ignore[attr-defined]
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
        elif kind == "corrupt":
            body = PAYLOAD[:1000] + bytes([PAYLOAD[1000] ^ 0xFF]) + PAYLOAD[1001:]
        elif kind == "truncated":
            body = PAYLOAD[: len(PAYLOAD) // 3]
        elif kind not in ("good", "drop"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(local_server) -> http.server.ThreadingHTTPServer:
    return local_server(_Handler, real_dir=Path("/nonexistent"))


def _base(srv: http.server.ThreadingHTTPServer, kind: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{kind}"


def _only(path: Path) -> list[str]:
    """Every file in path's folder (temp files included)."""
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


def test_good_download_verified(server, tmp_path: Path) -> None:
    dest = tmp_path / "d" / "file.bin"
    download("file.bin", dest, GOOD_SHA, [_base(server, "good")], progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert _only(dest) == ["file.bin"]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "drop", "missing"])
def test_bad_download_leaves_nothing(server, tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "d" / "file.bin"
    with pytest.raises(BnlabError, match=r"could not download file\.bin") as info:
        download("file.bin", dest, GOOD_SHA, [_base(server, kind)], progress=False)
    expected = {"corrupt": "SHA-256 mismatch", "truncated": "SHA-256 mismatch",
                "drop": "bytes", "missing": "HTTP 404"}[kind]
    assert expected in str(info.value)
    assert _base(server, kind) in str(info.value)
    assert not dest.exists()
    assert _only(dest) == []  # no temporary file left behind either


def test_interrupted_download_reports_how_much_arrived(server, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    with pytest.raises(BnlabError) as info:
        download("file.bin", dest, GOOD_SHA, [_base(server, "drop")], progress=False)
    # Either http.client's IncompleteRead or our length check; both name the shortfall.
    assert "51200" in str(info.value)
    assert _only(dest) == []


def test_mirrors_tried_in_order(server, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    mirrors = [_base(server, "drop"), _base(server, "corrupt"), "http://127.0.0.1:9/none",
               _base(server, "good")]
    download("file.bin", dest, GOOD_SHA, mirrors, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_existing_file_replaced_only_by_a_verified_one(server, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    with pytest.raises(BnlabError):
        download("file.bin", dest, GOOD_SHA, [_base(server, "corrupt")], progress=False)
    assert dest.read_bytes() == b"old"


def test_offline_no_data_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Port 9 (discard) on loopback: connection refused, i.e. no network for this test.
    monkeypatch.setenv("BNLAB_MIRRORS", "http://127.0.0.1:9/a http://127.0.0.1:9/b")
    with pytest.raises(BnlabError) as info:
        load_dataset("mnist", tmp_path / "mine", progress=False)
    msg = str(info.value)
    assert str(tmp_path / "mine" / "mnist") in msg
    assert str(tmp_path / "cache" / "bnlab" / "mnist") in msg
    assert "http://127.0.0.1:9/a/train-images-idx3-ubyte.gz" in msg
    assert "http://127.0.0.1:9/b/train-images-idx3-ubyte.gz" in msg
    assert "--data-dir" in msg and "BNLAB_DATA_DIR" in msg
    assert not (tmp_path / "mine" / "mnist").exists()  # no empty folder left behind
    with pytest.raises(BnlabError, match="looked in"):
        load_dataset("mnist", tmp_path / "mine", download=False)


def test_real_mnist_downloaded_over_http_into_cache(
    server, mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path: no local files -> download from the (local) mirror -> verified ->
    loaded; the second call finds the cached files."""
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    server.real_dir = mnist_dir / "mnist"
    data = load_dataset("mnist", progress=False, mirrors=[_base(server, "nothing-here"),
                                                          _base(server, "real")])
    cached = tmp_path / "cache" / "bnlab" / "mnist"
    assert data.source == f"downloaded to {cached}"
    assert sorted(p.name for p in cached.iterdir()) == sorted(SHA256["mnist"])
    assert len(data.train) == 60000 and len(data.test) == 10000
    server.real_dir = Path("/nonexistent")
    again = load_dataset("mnist", progress=False, mirrors=[_base(server, "real")])
    assert again.source == str(cached)
    assert (again.train.tensors[0] == data.train.tensors[0]).all()


def _copy_with_truncated(mnist_dir: Path, tmp_path: Path, filename: str) -> Path:
    """A copy of the real mnist/ folder under tmp_path, with ``filename`` cut short."""
    root = tmp_path / "copy"
    shutil.copytree(mnist_dir / "mnist", root / "mnist")
    victim = root / "mnist" / filename
    victim.write_bytes(victim.read_bytes()[:-10])
    return root


def test_corrupted_cached_file_is_reported(mnist_dir: Path, tmp_path: Path) -> None:
    root = _copy_with_truncated(mnist_dir, tmp_path, "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(BnlabError, match=r"t10k-labels-idx1-ubyte\.gz: SHA-256 mismatch"):
        load_dataset("mnist", root, download=False)


def test_corrupt_local_mnist_named_in_demo_note(mnist_dir: Path, tmp_path: Path) -> None:
    """The demo's fallback note says *why* MNIST was not used, e.g. a corrupt file."""
    from bnlab.demo import _load

    root = _copy_with_truncated(mnist_dir, tmp_path, "train-images-idx3-ubyte.gz")
    data, note = _load("auto", root, download=False)
    assert data.name == "digits"
    assert "train-images-idx3-ubyte.gz: SHA-256 mismatch" in note
