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
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bnlab._environ import environ
from bnlab._io import atomic_write_json
from bnlab.errors import BnlabError

FAILURE_DIR_ENV = "BNLAB_FAILURE_DIR"
"""Environment variable naming the folder where workers record their failures."""


class FailureRecord(NamedTuple):
    """What a worker recorded as it failed: ``time.time()`` and the exception's first line."""

    time: float
    error: str


def record_failure(exc: BaseException) -> None:
    """In a worker started by :func:`launch`, record that this rank is failing with ``exc``.

    Does nothing outside such a worker. Never raises: if the record cannot be written, the
    summary falls back to torchrun's own (whole-second) failure times.
    """
    folder, rank = os.environ.get(FAILURE_DIR_ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return
    text = str(exc).strip().splitlines()
    error = type(exc).__name__ + (f": {text[0][:300]}" if text else "")
    with contextlib.suppress(OSError, ValueError):
        atomic_write_json(Path(folder) / f"rank{int(rank)}.json",
                          {"time": time.time(), "error": error})


def read_failure_records(folder: str | os.PathLike[str]) -> dict[int, FailureRecord]:
    """The records :func:`record_failure` left in ``folder``, by rank (unreadable ones skipped)."""
    records: dict[int, FailureRecord] = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records[int(path.stem[4:])] = FailureRecord(float(data["time"]), str(data["error"]))
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


def launch(nproc: int, argv: Sequence[str], *, job: dict[str, Any] | None = None,
           job_flag: str = "--job") -> int:
    """Run ``python -m bnlab <argv>`` in ``nproc`` local workers under torchrun; exit code.

    ``job`` (a JSON object) is written to ``job.json`` in the launcher's temporary folder
    (which also holds the failure records), and the workers get ``<argv> job_flag <that
    file>``. Returns 0 when every worker succeeded; otherwise prints which rank
    failed first and how, and returns that worker's exit code (1 for a signal).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise BnlabError(f"--nproc must be a positive whole number of processes, got {nproc!r}")
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv must be a list of strings, got {argv!r}")

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with tempfile.TemporaryDirectory(prefix="bnlab-launch-") as folder, \
            environ(**{FAILURE_DIR_ENV: folder}):
        worker_argv = list(argv)
        if job is not None:
            atomic_write_json(Path(folder) / "job.json", job)
            worker_argv += [job_flag, str(Path(folder) / "job.json")]
        try:
            run(parse_args(torchrun_args(nproc, worker_argv)))
        except ChildFailedError as exc:
            records = read_failure_records(folder)
            print(failure_message(exc.failures, nproc=nproc, records=records),
                  file=sys.stderr, flush=True)
            root = exc.failures[_root_causes(exc.failures, records)[0]]
            return root.exitcode if root.exitcode > 0 else 1
        except SignalException as exc:  # the launcher itself got SIGTERM/SIGINT/…
            print(f"bnlab: launcher stopped by signal {exc.sigval.name}; workers were stopped",
                  file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
    return 0


def failure_message(
    failures: dict[int, Any], *, nproc: int, records: dict[int, FailureRecord] | None = None
) -> str:
    """One line per failed worker, the root cause first: its rank, exit code or signal.

    ``failures`` maps global rank to torch's ``ProcessFailure`` (``exitcode``, negative for
    a signal; ``timestamp``; ``signal_name()``). torchrun stops the surviving workers with
    SIGTERM once one has failed and reports them as failures too, so a worker that died of
    SIGTERM is only a failure of its own when it recorded an exception, or when every
    failure is a SIGTERM. ``records`` (from :func:`read_failure_records`) are the exceptions
    the workers recorded: those ranks come first, in the order they raised, and the line
    quotes the exception; the others follow, earliest (then lowest rank) first.
    ``nproc`` is the number of workers.
    """
    if not failures:
        raise ValueError("failure_message needs at least one failure")
    records = records or {}
    real = _root_causes(failures, records)
    lines = []
    for i, rank in enumerate(real):
        f = failures[rank]
        how = (f"was killed by {f.signal_name()}" if f.exitcode < 0
               else f"exited with code {f.exitcode}")
        raised = f"it raised {records[rank].error}" if rank in records else ""
        if i == 0:
            note = f" (first failure; {raised}; traceback above)" if raised else \
                " (first failure; its traceback, if any, is above)"
        else:
            note = f" ({raised})" if raised else ""
        lines.append(f"bnlab: rank {rank} failed: it {how}{note}")
    stopped = sorted(set(failures) - set(real))
    if stopped:
        ranks = ", ".join(str(r) for r in stopped)
        lines.append(f"bnlab: rank(s) {ranks} of {nproc} were then stopped by torchrun (SIGTERM)")
    return "\n".join(lines)


def _root_causes(failures: dict[int, Any], records: dict[int, FailureRecord]) -> list[int]:
    """The failed ranks that were not torchrun's SIGTERM teardown, earliest first.

    Ranks with a record come first, ordered by the recorded (sub-second) time.
    """
    sigterm = -int(signal.SIGTERM)
    real = [r for r in failures if failures[r].exitcode != sigterm or r in records]
    real = real or list(failures)
    never = float("inf")
    return sorted(real, key=lambda r: (records[r].time if r in records else never,
                                       failures[r].timestamp, r))
