"""Verified downloads: mirrors tried in order, SHA-256 checked, temp file then rename.

A file only ever appears under its final name after its whole body arrived and its
SHA-256 matched, so an interrupted, truncated or corrupted download never leaves a file
that looks valid (the temporary file is removed whatever happens).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from bnlab._io import atomic_path
from bnlab._progress import Progress
from bnlab.errors import BnlabError

MIRRORS_ENV = "BNLAB_MIRRORS"
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
    """Base URLs from ``$BNLAB_MIRRORS`` (comma or space separated), or None if unset."""
    text = os.environ.get(MIRRORS_ENV)
    if text is None:
        return None
    return [m for m in text.replace(",", " ").split() if m]


def _fetch(url: str, dest: Path, sha256: str, *, timeout: float, progress: bool | None) -> None:
    """Stream ``url`` into ``dest`` (via a temp file), checking length and SHA-256."""
    h = hashlib.sha256()
    received = 0
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                length_header = resp.headers.get("Content-Length")
                length = int(length_header) if length_header is not None else None
                with Progress(length, f"download {dest.name}", enabled=progress,
                              unit="B") as bar:
                    while chunk := resp.read(_CHUNK):
                        fh.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
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
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot connect ({exc.reason})") from None
    except (http.client.HTTPException, OSError) as exc:
        # IncompleteRead, a reset connection, a timeout mid-body …
        raise DownloadError(f"{type(exc).__name__} after {received} bytes: {exc}") from None


def download(
    filename: str,
    dest: str | os.PathLike[str],
    sha256: str,
    mirrors: Sequence[str],
    *,
    timeout: float = 30.0,
    progress: bool | None = None,
) -> Path:
    """Download ``filename`` from the first mirror that serves it intact, to ``dest``.

    Each mirror is a base URL; the file's URL is ``base.rstrip('/') + '/' + filename``.
    Raises :class:`BnlabError` listing every mirror's failure if none worked.
    """
    dest = Path(dest)
    if not mirrors:
        raise BnlabError(f"no download mirrors configured for {filename}")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            _fetch(url, dest, sha256, timeout=timeout, progress=progress)
        except DownloadError as exc:
            failures.append(f"  {url}: {exc}")
            continue
        return dest
    raise BnlabError(f"could not download {filename}:\n" + "\n".join(failures))
