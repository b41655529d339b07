"""Verified downloads: mirrors tried in order, size and SHA-256 checked, temp file then rename.

A file only ever appears under its final name after its whole body arrived and its
SHA-256 matched, so an interrupted, truncated or corrupted download never leaves a file
that looks valid (the temporary file is removed whatever happens).

What a server can make bnlab spend is bounded: with the file's expected ``size`` known, a
``Content-Length`` announcing more is refused before the body is read, and a body that
grows past it is cut off as soon as it does; besides the socket timeout (one stalled read),
each file has an overall deadline (``$BNLAB_DOWNLOAD_DEADLINE_S``, default
:data:`DEFAULT_DEADLINE_S`), enforced by a watchdog that shuts the connection down, so a
server trickling a byte at a time is cut off too.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bnlab._io import atomic_path
from bnlab._progress import Progress
from bnlab.errors import BnlabError

MIRRORS_ENV = "BNLAB_MIRRORS"
DEADLINE_ENV = "BNLAB_DOWNLOAD_DEADLINE_S"
DEFAULT_DEADLINE_S = 600.0
"""Seconds one file's download may take in all (connect, headers, body) by default."""

_CHUNK = 1 << 16


class DownloadError(Exception):
    """One mirror failed for one file (the caller tries the next mirror)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def env_mirrors() -> list[str] | None:
    """Base URLs from ``$BNLAB_MIRRORS`` (comma or space separated), or None if unset.

    Set but empty (``BNLAB_MIRRORS=""``) means no mirrors at all: ``[]``, never download.
    """
    text = os.environ.get(MIRRORS_ENV)
    if text is None:
        return None
    return [m for m in text.replace(",", " ").split() if m]


def check_mirrors(mirrors: Sequence[str]) -> None:
    """Refuse, by name, a mirror that is not an ``http://`` or ``https://`` URL."""
    for base in mirrors:
        scheme, sep, rest = base.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
            raise BnlabError(
                f"download mirror {base!r} is not an http:// or https:// URL "
                f"(from ${MIRRORS_ENV} or the mirrors argument)"
            )


def env_deadline_s() -> float:
    """The per-file deadline from ``$BNLAB_DOWNLOAD_DEADLINE_S``, else the default."""
    text = os.environ.get(DEADLINE_ENV)
    if text is None or not text.strip():
        return DEFAULT_DEADLINE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise BnlabError(f"${DEADLINE_ENV} must be a positive number of seconds, got {text!r}")
    return value


class _Watchdog:
    """Shuts down every connection it was shown once ``seconds`` have passed.

    A blocked read then returns (or raises) at once, whatever the server keeps sending.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shutdown(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed (or detached by TLS)
            sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._timer.start()
        try:
            yield
        finally:
            self._timer.cancel()


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's usual HTTP(S) handling (proxies, redirects, errors), no other scheme, every
    connection shown to ``watchdog``."""

    def watched(base: type[http.client.HTTPConnection]) -> Any:
        class Watched(base):  # type: ignore[valid-type,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection  # type: ignore[has-type]  # TCP, pre-TLS
                self._create_connection = lambda *a, **k: watchdog.watch(create(*a, **k))

            def connect(self) -> None:
                super().connect()
                watchdog.watch(self.sock)  # the TLS socket, for https

        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(watched(http.client.HTTPSConnection), req,
                                context=getattr(self, "_context", None))

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), HTTP(), HTTPS(),
                    urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, dest: Path, sha256: str, *, size: int | None, timeout: float,
           deadline_s: float, progress: bool | None) -> None:
    """Stream ``url`` into ``dest`` (via a temp file), checking length, size and SHA-256."""
    h = hashlib.sha256()
    received = 0
    watchdog = _Watchdog(deadline_s)
    late = (f"took longer than the download deadline of {deadline_s:g} s "
            f"(${DEADLINE_ENV})")
    try:
        with watchdog.running(), atomic_path(dest) as tmp:
            with _opener(watchdog).open(url, timeout=min(timeout, deadline_s)) as resp, \
                    open(tmp, "wb") as fh:
                length_header = resp.headers.get("Content-Length")
                try:
                    length = int(length_header) if length_header is not None else None
                except ValueError:
                    raise DownloadError(f"bad Content-Length {length_header!r}") from None
                if length is not None and size is not None and length > size:
                    raise DownloadError(
                        f"the server announces {length} bytes, expected {size}: refused "
                        "before reading it"
                    )
                limit = size if size is not None else length
                with Progress(length or size, f"download {dest.name}", enabled=progress,
                              unit="B") as bar:
                    # read1: whatever one read of the socket gave, so the watchdog and the
                    # size cap are checked after every packet, not every 64 KiB
                    while chunk := resp.read1(_CHUNK):
                        received += len(chunk)
                        if limit is not None and received > limit:
                            raise DownloadError(
                                f"the body grew past the expected {limit} bytes; cut off"
                            )
                        fh.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            if watchdog.expired:
                raise DownloadError(f"{late}; cut off after {received} bytes")
            if length is not None and received != length:
                raise DownloadError(f"connection closed after {received} of {length} bytes")
            if h.hexdigest() != sha256:
                raise DownloadError(
                    f"SHA-256 mismatch ({received} bytes): got {h.hexdigest()}, "
                    f"expected {sha256}"
                )
    except DownloadError:
        raise
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if watchdog.expired:
            raise DownloadError(f"{late}; cut off after {received} bytes") from None
        if isinstance(exc, urllib.error.URLError):
            raise DownloadError(f"cannot connect ({exc.reason})") from None
        # IncompleteRead, a reset connection, a timeout mid-body …
        raise DownloadError(f"{type(exc).__name__} after {received} bytes: {exc}") from None


def download(
    filename: str,
    dest: str | os.PathLike[str],
    sha256: str,
    mirrors: Sequence[str],
    *,
    size: int | None = None,
    timeout: float = 30.0,
    deadline_s: float | None = None,
    progress: bool | None = None,
) -> Path:
    """Download ``filename`` from the first mirror that serves it intact, to ``dest``.

    Each mirror is a base URL (``http://`` or ``https://``); the file's URL is
    ``base.rstrip('/') + '/' + filename``. ``size``: the file's exact size in bytes when
    known (a larger announced or received body is refused at once). ``timeout`` bounds
    each socket operation; ``deadline_s`` (default: ``$BNLAB_DOWNLOAD_DEADLINE_S`` or
    :data:`DEFAULT_DEADLINE_S`) bounds the whole of each attempt. Raises
    :class:`BnlabError` listing every mirror's failure if none worked.
    """
    dest = Path(dest)
    if not mirrors:
        raise BnlabError(f"no download mirrors configured for {filename}")
    check_mirrors(mirrors)
    deadline = env_deadline_s() if deadline_s is None else deadline_s
    if not 0 < deadline < math.inf:
        raise BnlabError(f"deadline_s must be a positive number of seconds, got {deadline_s}")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            _fetch(url, dest, sha256, size=size, timeout=timeout, deadline_s=deadline,
                   progress=progress)
        except DownloadError as exc:
            failures.append(f"{url}: {exc}")
            continue
        return dest
    raise BnlabError(f"could not download {filename}: " + "; ".join(failures))
