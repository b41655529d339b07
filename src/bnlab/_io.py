"""Lossless file writes: everything bnlab saves goes to a temporary file, then is renamed.

A reader (or a rerun after SIGKILL) therefore sees either the old file or the complete new
one, never a half-written file that looks valid.

Temporary files are named ``.<name>.<pid>.<random>.tmp`` next to their target, so they are
recognisably ours and say which process wrote them: :func:`remove_stale_temps` deletes
those whose writer is gone (a SIGKILL leaves them behind). A write that fails because the
disk is full or a file-size limit is hit raises :class:`WriteError` saying so; the
partial temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from bnlab.errors import DISK_FULL, BnlabError, describe_os_error, errno_text


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# mkstemp's random part: 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_STAGING_NAME = re.compile(r"^\.bnlab-staging\.(?P<pid>\d+)\.[a-z0-9_]{8}$")
# safetensors (Rust) reports an I/O failure as text: "... Os { code: 28, kind: StorageFull".
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")


class WriteError(BnlabError):
    """A file could not be written because the disk (or a limit) is full; see the message
    for what is intact."""


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists on this machine (it may be another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _full_reason(exc: BaseException) -> str | None:
    """Why a write failed, if because a disk or size limit is full; else None."""
    code: int | None = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, OSError):
        match = _RUST_ERRNO.search(str(exc))
        code = int(match.group(1)) if match else None
    return errno_text(code) if code in DISK_FULL else None


def _write_error(target: Path, existed: bool, reason: str) -> WriteError:
    kept = (f"the previous {target.name} is intact" if existed
            else f"no {target.name} was written")
    return WriteError(f"cannot write {target}: {reason}; {kept}, and the partial temporary "
                      "file was removed")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched; a full
    disk or file-size limit becomes :class:`WriteError`.
    """
    target = Path(path)
    if target.is_dir():
        raise BnlabError(f"{target}: is a folder, expected a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    existed = target.exists()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.replace(tmp, target)
        except OSError as exc:  # named after the target, not the temporary file
            raise BnlabError(f"cannot write {describe_os_error(exc, target)}") from None
    except Exception as exc:
        reason = _full_reason(exc)
        if reason is None:
            raise
        raise _write_error(target, existed, reason) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(binary_file)`` on a temporary file, then rename it onto ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON line and flush it to disk (a metrics log that grows as it runs).

    A full disk raises :class:`WriteError`; the lines written before are intact (a cut
    last line is what a reader of a growing log must skip anyway).
    """
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, allow_nan=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        reason = _full_reason(exc)
        if reason is None:
            raise
        raise WriteError(f"cannot append to {path}: {reason}; the lines before are "
                         "intact") from None


def remove_stale_temps(folder: str | os.PathLike[str], *, recursive: bool = False
                       ) -> list[Path]:
    """Delete the temporary files (and staging folders) of bnlab processes that are gone.

    Only names of our pattern (``.<name>.<pid>.<random>.tmp``, ``.bnlab-staging.<pid>.…``)
    whose PID no longer runs are touched; a live writer's files are left alone. Returns
    what was removed. A missing ``folder`` is nothing to do.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    walk = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir()])]
    for dirpath, _, names in walk:
        for name in names:
            match = _TEMP_NAME.match(name) or _STAGING_NAME.match(name)
            if match is None or pid_alive(int(match.group("pid"))):
                continue
            path = Path(dirpath) / name
            with suppress(OSError):  # gone meanwhile, or not ours to delete
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


@contextmanager
def replace_on_success(folder: str | os.PathLike[str], names: Sequence[str]) -> Iterator[Path]:
    """Write a new set of files into ``folder`` without losing the old set on failure.

    Yields an empty staging folder inside ``folder``; the caller writes the new files
    there. If the block completes, each of ``names`` in ``folder`` is replaced by its new
    version (or removed, if the block did not write it), the last name (the completion
    marker, e.g. ``summary.json``) being removed first and moved in last, so no moment
    shows an old marker next to new files. If the block raises (Ctrl-C included), the
    staging folder is removed and ``folder`` keeps its old files untouched. Other files in
    ``folder`` are never touched.
    """
    if not names:
        raise ValueError("replace_on_success needs at least one file name")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".bnlab-staging.{os.getpid()}.", dir=root))
    try:
        yield staging
        *files, marker = names
        (root / marker).unlink(missing_ok=True)
        for name in (*files, marker):
            new = staging / name
            if new.exists():
                os.replace(new, root / name)
            else:
                (root / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
