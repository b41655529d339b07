"""Errors that bnlab reports to a person rather than as a traceback."""

from __future__ import annotations

import errno


class BnlabError(Exception):
    """A problem with what the user asked for (bad input, missing data, a broken file).

    The message names what is wrong and what was expected. The CLI prints it without a
    traceback and exits with code 2. Library callers can catch it like any exception.
    """

    exit_code = 2


_EXPECTED = {
    errno.ENOENT: "no such file or folder (a missing or uncreatable folder on the way, or "
                  "a symlink to nothing)",
    errno.ENOTDIR: "a part of the path is a file where a folder was expected",
    errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "already exists and is not a folder (a file, or a symlink to nothing)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "on a read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is full",
    errno.EFBIG: "the file-size limit was reached (ulimit -f)",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "the name is too long",
}


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""The errno values of a write that failed because a disk or a size limit is full."""


def describe_os_error(exc: OSError, path: object = None) -> str:
    """One line for a person: the path (``path``, else the exception's) and what is wrong."""
    where = path if path is not None else exc.filename
    what = errno_text(exc.errno) or (exc.strerror or str(exc)).lower()
    return f"{where}: {what}" if where is not None else what


def errno_text(code: int | None) -> str | None:
    """What an errno means for a path, in words a person can act on (None: no entry)."""
    return _EXPECTED.get(code) if code is not None else None
