"""One bnlab process per folder: an exclusive lock file holding the holder's PID.

``with folder_lock(path, "bnlab experiment"):`` creates ``path`` if needed and holds
``path/.bnlab.lock`` for the block. The lock is an ``flock`` on that file, so the kernel
releases it when its process dies however it dies (SIGKILL included); the file itself
records who holds it (PID, command, start time) for the message a second process gets.
A lock file left by a process that is gone is taken over with a note on stderr. While it
holds the lock, the holder is the folder's only bnlab writer, so it also removes the
temporary files that dead bnlab processes left under the folder
(:func:`bnlab._io.remove_stale_temps`).

Linux and macOS; on a network file system ``flock`` is only as good as the server's.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bnlab._io import remove_stale_temps
from bnlab.errors import BnlabError

LOCK_FILE = ".bnlab.lock"


class FolderLocked(BnlabError):
    """Another live bnlab process holds the folder's lock."""


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} if empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    pid = info.get("pid", "unknown")
    what = f", {info['command']}" if isinstance(info.get("command"), str) else ""
    since = info.get("started")
    when = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
            if isinstance(since, int | float) else "")
    return f"PID {pid}{what}{when}"


def _open_locked(lock: Path) -> tuple[int, dict[str, Any]]:
    """Open and flock ``lock`` (retrying if the file was replaced meanwhile)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise FolderLocked(
                f"{lock.parent} is in use by another bnlab process ({_describe(info)}); "
                "wait for it to finish or stop it, or choose another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited on may have released by unlinking: then our fd is for a
        # file no longer at ``lock``, and another process may lock the new one. Retry.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _holder(fd)
        os.close(fd)


@contextmanager
def folder_lock(path: str | os.PathLike[str], command: str = "bnlab") -> Iterator[Path]:
    """Hold ``path``'s lock for the block (creating ``path``); yields the folder.

    Raises :class:`FolderLocked` naming the holder's PID if a live process holds it, a
    :class:`BnlabError` if ``path`` is a file, and the ``OSError`` (which names the path)
    if it cannot be created. Released in ``finally``; a folder this call created and that
    is still empty then is removed again.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise BnlabError(f"{folder}: exists and is not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)  # an OSError names the path: the CLI says why
    lock = folder / LOCK_FILE
    try:
        fd, previous = _open_locked(lock)
    except OSError as exc:
        raise BnlabError(f"{lock}: cannot create the lock file ({exc.strerror or exc})") from None
    try:
        if previous.get("pid") not in (None, os.getpid()):
            print(f"bnlab: note: took over the lock of {folder} left by "
                  f"{_describe(previous)}, which is no longer running", file=sys.stderr)
        me = {"pid": os.getpid(), "command": command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)
        remove_stale_temps(folder, recursive=True)
        yield folder
    finally:
        with suppress(OSError):
            lock.unlink()  # before the unlock: a waiter then sees a replaced file, retries
        os.close(fd)
        if created:
            with suppress(OSError):
                folder.rmdir()  # only if nothing was written
