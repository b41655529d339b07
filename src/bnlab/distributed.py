"""Multi-process runs through torch's own launcher (``torch.distributed.run``, i.e. torchrun).

``bnlab train --nproc N …`` calls :func:`launch`, which runs torchrun's elastic agent in this
process with::

    --nnodes 1 --nproc-per-node N --max-restarts 0
    --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1
    -m bnlab <argv>

so the rendezvous store, ``MASTER_ADDR`` and every worker connection stay on loopback, and
the store port is picked by the OS (no fixed port to collide on). Each worker is a plain
``python -m bnlab <argv>`` that sees torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``. Multi-node runs use torchrun directly with its own
rendezvous flags (see the README); nothing here re-implements a rendezvous.

Failure behaviour (what bounds the time to a non-zero exit):

* a worker raises or is killed: torchrun's agent notices within its monitor interval
  (0.1 s), stops the other workers (SIGTERM), and :func:`launch` returns the failed
  worker's exit code (1 if it was killed by a signal) after printing
  ``bnlab: rank R failed …``;
* a worker hangs without dying: the others block in their next collective until the
  process-group timeout (``TrainConfig.dist_timeout_s``, ``--dist-timeout``, default
  120 s), then raise, which is the case above.

Which rank failed *first*: torchrun stamps each failure with whole seconds when its agent
notices the exit, so a rank that raised and a peer whose collective broke because of it
can tie, and a rank can die of a signal while it tears down after raising. So each worker
also records the moment an exception leaves :func:`bnlab.train.train` (before it closes
its process group, so before any peer can fail because of it): :func:`record_failure`
writes ``rank<R>.json`` (time and the exception's first line) into a folder that
:func:`launch` creates and names in ``$BNLAB_FAILURE_DIR``. The summary puts recorded
failures first, in the order they happened, and quotes the exception.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bnlab._environ import environ
from bnlab._io import atomic_write_json
from bnlab.errors import BnlabError

_KILL_SLACK_S = 1.0
"""How much earlier than it was seen a SIGKILLed worker's exit counts (see _root_causes)."""

MAX_TIMEOUT_S = 1e9
"""Timeouts at or above this (about 31 years) are refused: torch cannot represent them."""

FAILURE_DIR_ENV = "BNLAB_FAILURE_DIR"
"""Environment variable naming the folder where workers record their failures."""


class FailureRecord(NamedTuple):
    """What a worker recorded as it failed: ``time.time()``, the exception's first line, and
    for a :class:`BnlabError` (bad input) its message, which the launcher prints alone."""

    time: float
    error: str
    bad_input: str | None = None


def record_failure(exc: BaseException) -> bool:
    """In a worker started by :func:`launch`, record that this rank is failing with ``exc``.

    Does nothing outside such a worker, or when this rank already recorded a failure (the
    first one is the cause). Never raises: if the record cannot be written, the summary
    falls back to torchrun's own (whole-second) failure times. True if a record exists.
    """
    folder, rank = os.environ.get(FAILURE_DIR_ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return False
    now = time.time()
    with contextlib.suppress(OSError, ValueError):
        path = Path(folder) / f"rank{int(rank)}.json"
        if path.exists():
            return True
        text = str(exc).strip().splitlines()
        error = type(exc).__name__ + (f": {text[0][:300]}" if text else "")
        record: dict[str, Any] = {"time": now, "error": error}
        if isinstance(exc, BnlabError):
            record["bad_input"] = " ".join(str(exc).split())[:2000]
        atomic_write_json(path, record)
        return True
    return False


def read_failure_records(folder: str | os.PathLike[str]) -> dict[int, FailureRecord]:
    """The records :func:`record_failure` left in ``folder``, by rank (unreadable ones skipped)."""
    records: dict[int, FailureRecord] = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            bad = data.get("bad_input")
            records[int(path.stem[4:])] = FailureRecord(
                float(data["time"]), str(data["error"]), None if bad is None else str(bad))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def torchrun_args(nproc: int, argv: Sequence[str], *, run_id: str | None = None) -> list[str]:
    """torchrun's command line (without the ``torchrun`` itself) for N local workers."""
    return [
        "--nnodes", "1",
        "--nproc-per-node", str(nproc),
        "--max-restarts", "0",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "127.0.0.1:0",
        "--rdzv-id", run_id or uuid.uuid4().hex,
        "--local-addr", "127.0.0.1",
        "--module", "bnlab",
        *argv,
    ]


class ChildExit(NamedTuple):
    """The first child process of the launcher to exit: its PID and when (``time.time()``)."""

    pid: int
    time: float


class _FirstExitWatch:
    """Notes the first child of this process to exit, the moment it does.

    A thread blocks in ``waitid(WNOWAIT)``, which returns as soon as a child has exited
    without reaping it (torchrun's agent still collects its status as usual). A worker
    killed by a signal records nothing itself, and the peers whose collectives break
    because of it record their exceptions only after it died, so this time is what puts it
    first.
    """

    def __init__(self) -> None:
        self.first: ChildExit | None = None
        self._stop = threading.Event()
        if hasattr(os, "waitid"):
            threading.Thread(target=self._wait, name="bnlab-first-exit", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _wait(self) -> None:
        while not self._stop.is_set():
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # no worker started yet
                self._stop.wait(0.01)
                continue
            except OSError:
                return
            if info is not None:
                self.first = ChildExit(info.si_pid, time.time())
            return


@contextlib.contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """torchrun's agent logs each worker's failure and the SIGTERMs it sends; the summary
    says all of that in one place, so its log is kept to critical messages meanwhile."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def launch(nproc: int, argv: Sequence[str], *, job: dict[str, Any] | None = None,
           job_flag: str = "--job", timeout_s: float | None = None) -> int:
    """Run ``python -m bnlab <argv>`` in ``nproc`` local workers under torchrun; exit code.

    ``job`` (a JSON object) is written to ``job.json`` in the launcher's temporary folder
    (which also holds the failure records), and the workers get ``<argv> job_flag <that
    file>``. ``timeout_s``, the workers' process-group timeout, is only used to explain a
    timeout in the failure message. Returns 0 when every worker succeeded. When the first
    failure is bad input (a :class:`BnlabError` in a worker, which then prints nothing
    itself), prints that one message as ``bnlab CMD: error: …`` and returns its exit code
    (2); otherwise prints which rank failed first and how, and returns that worker's exit
    code (1 for a signal).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise BnlabError(f"--nproc must be a positive whole number of processes, got {nproc!r}")
    if timeout_s is not None and not 0 < timeout_s < MAX_TIMEOUT_S:
        raise BnlabError(f"--dist-timeout must be positive seconds below {MAX_TIMEOUT_S:g}, "
                         f"got {timeout_s}")
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv must be a list of strings, got {argv!r}")

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = f"bnlab {argv[0]}" if argv else "bnlab"
    with tempfile.TemporaryDirectory(prefix="bnlab-launch-") as folder, \
            environ(**{FAILURE_DIR_ENV: folder}), _quiet_torchrun():
        worker_argv = list(argv)
        if job is not None:
            atomic_write_json(Path(folder) / "job.json", job)
            worker_argv += [job_flag, str(Path(folder) / "job.json")]
        watch = _FirstExitWatch()
        try:
            run(parse_args(torchrun_args(nproc, worker_argv)))
        except ChildFailedError as exc:
            records = read_failure_records(folder)
            first = _root_causes(exc.failures, records, watch.first)[0]
            root = exc.failures[first]
            bad_input = records[first].bad_input if first in records else None
            if bad_input is not None:
                print(f"{command}: error: {bad_input}", file=sys.stderr, flush=True)
            else:
                print(failure_message(exc.failures, nproc=nproc, records=records,
                                      first_exit=watch.first, timeout_s=timeout_s),
                      file=sys.stderr, flush=True)
            return root.exitcode if root.exitcode > 0 else 1
        except SignalException as exc:  # the launcher itself got SIGTERM/SIGINT/…
            print(f"bnlab: launcher stopped by signal {exc.sigval.name}; workers were stopped",
                  file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
        finally:
            watch.stop()
    return 0


def failure_message(
    failures: dict[int, Any], *, nproc: int, records: dict[int, FailureRecord] | None = None,
    first_exit: ChildExit | None = None, timeout_s: float | None = None,
) -> str:
    """One line per failed worker, the root cause first: its rank, exit code or signal.

    ``failures`` maps global rank to torch's ``ProcessFailure`` (``exitcode``, negative for
    a signal; ``timestamp``; ``pid``; ``signal_name()``). torchrun stops the surviving
    workers with SIGTERM once one has failed and reports them as failures too, so a worker
    that died of SIGTERM is only a failure of its own when it recorded an exception, or
    when every failure is a SIGTERM. ``records`` (from :func:`read_failure_records`) are
    the exceptions the workers recorded and ``first_exit`` the worker process that exited
    first: ranks come in the order of their first sign of failure (the recorded exception,
    or that exit), and the line quotes the exception; the others follow, earliest (then
    lowest rank) first. ``nproc`` is the number of workers. With ``timeout_s`` (the
    process-group timeout), a first failure that mentions a timeout says which it was.
    """
    if not failures:
        raise ValueError("failure_message needs at least one failure")
    records = records or {}
    real = _root_causes(failures, records, first_exit)
    lines = []
    for i, rank in enumerate(real):
        f = failures[rank]
        how = (f"was killed by {f.signal_name()}" if f.exitcode < 0
               else f"exited with code {f.exitcode}")
        raised = f"it raised {records[rank].error}" if rank in records else ""
        if i == 0:
            if raised:
                note = f" (first failure; {raised}; traceback above)"
            elif f.exitcode < 0:
                note = " (first failure; it died of the signal without raising)"
            else:
                note = " (first failure; its traceback, if any, is above)"
            if timeout_s is not None and rank in records and re.search(
                    r"time(d)? ?out", records[rank].error, re.IGNORECASE):
                note += (f"; the workers' timeout (--dist-timeout) is {timeout_s:g} s: it bounds "
                         "the start-up rendezvous as well as every collective, so a value "
                         "below the time the workers need to start and connect fails here")
        else:
            note = f" ({raised})" if raised else ""
        lines.append(f"bnlab: rank {rank} failed: it {how}{note}")
    stopped = sorted(set(failures) - set(real))
    if stopped:
        ranks = ", ".join(str(r) for r in stopped)
        lines.append(f"bnlab: rank(s) {ranks} of {nproc} were then stopped by torchrun (SIGTERM)")
    return "\n".join(lines)


def _root_causes(failures: dict[int, Any], records: dict[int, FailureRecord],
                 first_exit: ChildExit | None = None) -> list[int]:
    """The failed ranks that were not torchrun's SIGTERM teardown, earliest first.

    A rank's moment is its recorded (sub-second) exception time, or, for the worker that
    exited first, its exit time if earlier; ranks without either follow, by torchrun's
    whole-second timestamps.
    """
    sigterm = -int(signal.SIGTERM)
    real = [r for r in failures if failures[r].exitcode != sigterm or r in records]
    real = real or list(failures)
    never = float("inf")

    def moment(r: int) -> float:
        t = records[r].time if r in records else never
        if first_exit is not None and getattr(failures[r], "pid", None) == first_exit.pid:
            seen = first_exit.time
            if r not in records and failures[r].exitcode == -int(signal.SIGKILL):
                # Its sockets closed as it died, a moment before the exit was seen: a peer
                # can record the broken collective in between. Nothing in bnlab or torch
                # sends SIGKILL, so a worker dying of it first is the cause.
                seen -= _KILL_SLACK_S
            t = min(t, seen)
        return t

    return sorted(real, key=lambda r: (moment(r), failures[r].timestamp, r))
