"""Multi-process training through torchrun: `bnlab train --nproc N`, its results and failures.

Every run here is real: torchrun's agent, gloo workers, rendezvous on 127.0.0.1. Failures
are injected without touching bnlab: a ``sitecustomize.py`` on the workers' PYTHONPATH
registers a global optimizer step hook in one rank that raises (or hangs) at step 3.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bnlab.distributed import (
    FAILURE_DIR_ENV,
    FailureRecord,
    failure_message,
    launch,
    read_failure_records,
    record_failure,
    torchrun_args,
)

TRAIN_ARGS = [
    "train", "--model", "seed_cnn", "--norm", "bn", "--dataset", "digits", "--steps", "20",
    "--batch-size", "64", "--eval-every", "1", "--eval-subset", "64", "--threads", "1",
]

INJECT = textwrap.dedent(
    """
    import os

    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get(
        "BNLAB_TEST_FAIL_RANK"
    ):
        import time

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _calls = [0]

        def _fail(optimizer, args, kwargs):
            _calls[0] += 1
            if _calls[0] == int(os.environ["BNLAB_TEST_FAIL_STEP"]):
                if os.environ["BNLAB_TEST_FAIL_MODE"] == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"injected failure at step {_calls[0]}")

        register_optimizer_step_pre_hook(_fail)
    """
)


def _bnlab(args: list[str], *, timeout: float, env: dict[str, str] | None = None
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bnlab", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )
    return proc, time.monotonic() - t0


def _inject_env(tmp_path: Path, *, rank: int, step: int, mode: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BNLAB_TEST_FAIL_RANK": str(rank),
            "BNLAB_TEST_FAIL_STEP": str(step), "BNLAB_TEST_FAIL_MODE": mode}


def test_torchrun_args_keep_everything_on_loopback() -> None:
    args = torchrun_args(3, ["train", "--steps", "5"], run_id="abc")
    assert args[args.index("--nproc-per-node") + 1] == "3"
    assert args[args.index("--rdzv-endpoint") + 1] == "127.0.0.1:0"
    assert args[args.index("--local-addr") + 1] == "127.0.0.1"
    assert args[args.index("--max-restarts") + 1] == "0"
    assert args[-5:] == ["--module", "bnlab", "train", "--steps", "5"]

    from torch.distributed.run import parse_args

    parsed = parse_args(args)  # torchrun itself accepts the command line
    assert parsed.nproc_per_node == "3" and parsed.module
    assert parsed.training_script == "bnlab"
    assert parsed.training_script_args == ["train", "--steps", "5"]


@pytest.mark.parametrize(
    ("nproc", "argv", "error", "match"),
    [
        (0, ["train"], "BnlabError", "--nproc must be a positive"),
        (2, "train", "TypeError", "argv must be a list of strings"),
    ],
    ids=["nproc0", "argv-str"],
)
def test_launch_rejects_bad_arguments(nproc: int, argv: list[str], error: str, match: str
                                      ) -> None:
    with pytest.raises(Exception, match=match) as info:
        launch(nproc, argv)
    assert type(info.value).__name__ == error


def test_failure_message_names_first_failed_rank_and_signal(tmp_path: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    missing = str(tmp_path / "no-error-file.json")

    def failure(exitcode: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=0, pid=10, exitcode=exitcode, error_file=missing)
        f.timestamp = timestamp
        return f

    # rank 0 torn down by torchrun (SIGTERM) in the same second: not the root cause
    text = failure_message({0: failure(-15, 100), 3: failure(-9, 105), 1: failure(1, 100)},
                           nproc=4)
    assert text.splitlines() == [
        "bnlab: rank 1 failed: it exited with code 1 (first failure; its traceback, if any, "
        "is above)",
        "bnlab: rank 3 failed: it was killed by SIGKILL",
        "bnlab: rank(s) 0 of 4 were then stopped by torchrun (SIGTERM)",
    ]
    # only SIGTERMs (someone killed a worker with SIGTERM): that is the failure
    only = failure_message({1: failure(-15, 100)}, nproc=2)
    assert only.startswith("bnlab: rank 1 failed: it was killed by SIGTERM (first failure")
    with pytest.raises(ValueError, match="at least one failure"):
        failure_message({}, nproc=2)


def test_recorded_exceptions_order_the_failures_and_are_quoted(tmp_path: Path) -> None:
    """torchrun's whole-second stamps tie (rank 0 would come first), and rank 1 died of a
    signal in its teardown: the records say rank 1 raised first, and what it raised."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    missing = str(tmp_path / "no-error-file.json")

    def failure(exitcode: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=0, pid=10, exitcode=exitcode, error_file=missing)
        f.timestamp = timestamp
        return f

    failures = {0: failure(1, 100), 1: failure(-6, 100), 2: failure(-15, 100)}
    records = {1: FailureRecord(50.25, "RuntimeError: boom"),
               0: FailureRecord(50.5, "RuntimeError: Connection closed by peer")}
    assert failure_message(failures, nproc=3, records=records).splitlines() == [
        "bnlab: rank 1 failed: it was killed by SIGABRT (first failure; it raised "
        "RuntimeError: boom; traceback above)",
        "bnlab: rank 0 failed: it exited with code 1 (it raised RuntimeError: Connection "
        "closed by peer)",
        "bnlab: rank(s) 2 of 3 were then stopped by torchrun (SIGTERM)",
    ]
    # without records the same failures fall back to torchrun's stamps, then the rank
    assert failure_message(failures, nproc=3).startswith(
        "bnlab: rank 0 failed: it exited with code 1 (first failure; its traceback")


def test_record_failure_writes_only_inside_a_launched_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FAILURE_DIR_ENV, raising=False)
    monkeypatch.setenv("RANK", "3")
    record_failure(RuntimeError("not recorded"))  # no folder: nothing to write, no error
    assert read_failure_records(tmp_path) == {}

    monkeypatch.setenv(FAILURE_DIR_ENV, str(tmp_path))
    before = time.time()
    record_failure(ValueError("bad value\nsecond line"))
    (tmp_path / "rank7.json").write_text("{not json")  # a broken record is skipped
    records = read_failure_records(tmp_path)
    assert list(records) == [3]
    assert records[3].error == "ValueError: bad value"
    assert before <= records[3].time <= time.time()


@pytest.mark.slow
def test_two_workers_sync_bn_match_one_process_losses(tmp_path: Path) -> None:
    """Acceptance 2: --nproc 2 --sync-bn, global batch 64 == one process, batch 64, plain BN."""
    from bnlab.train import TrainConfig, train

    out = tmp_path / "dist"
    proc, _ = _bnlab([*TRAIN_ARGS, "--nproc", "2", "--sync-bn", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr
    dist_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64

    ref = train(TrainConfig(model="seed_cnn", norm="bn", dataset="digits", steps=20,
                            batch_size=64, eval_every=1, eval_subset=64, seed=0), None,
                progress=False)
    assert [r["step"] for r in dist_rows] == [r["step"] for r in ref.metrics] == list(
        range(1, 21)
    )
    diffs = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(dist_rows, ref.metrics,
                                                                      strict=True)]
    assert max(diffs) <= 1e-5, diffs
    # the losses move, so the comparison is not between two constant sequences
    assert ref.metrics[-1]["train_loss"] < 0.5 * ref.metrics[0]["train_loss"]


@pytest.mark.slow
def test_worker_raising_at_step_3_ends_job_nonzero_naming_rank(tmp_path: Path) -> None:
    """Acceptance 3: rank 1 raises at step 3; the job exits non-zero, fast, naming rank 1."""
    env = _inject_env(tmp_path, rank=1, step=3, mode="raise")
    out = tmp_path / "out"
    # subprocess.run's timeout is the hard bound: a hang fails the test instead of CI.
    proc, elapsed = _bnlab([*TRAIN_ARGS, "--nproc", "2", "--dist-timeout", "30", "--out",
                            str(out)], timeout=120, env=env)
    assert proc.returncode != 0
    assert "injected failure at step 3" in proc.stderr
    # rank 1 exits with code 1; gloo's teardown can rarely abort it after the exception was
    # raised and recorded, which the summary then reports as it happened
    assert re.search(r"^bnlab: rank 1 failed: it (exited with code 1|was killed by SIGABRT) "
                     r"\(first failure; it raised RuntimeError: injected failure at step 3; "
                     r"traceback above\)$", proc.stderr, re.MULTILINE), proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert elapsed < 30 + 30, f"took {elapsed:.1f}s"


@pytest.mark.slow
def test_hung_worker_is_bounded_by_the_process_group_timeout(tmp_path: Path) -> None:
    """Rank 1 hangs (does not die) at step 3: rank 0's collective times out after
    --dist-timeout, rank 0 fails, torchrun stops rank 1, and the job exits non-zero."""
    env = _inject_env(tmp_path, rank=1, step=3, mode="hang")
    proc, elapsed = _bnlab([*TRAIN_ARGS, "--nproc", "2", "--dist-timeout", "5"],
                           timeout=120, env=env)
    assert proc.returncode != 0
    assert re.search(r"^bnlab: rank 0 failed: it exited with code 1 \(first failure; it raised "
                     r"\w+: .*(timed out|timeout)", proc.stderr,
                     re.IGNORECASE | re.MULTILINE), proc.stderr[-2000:]
    # gloo words it as "Timed out waiting 5000ms …" or "Application timeout caused …"
    assert re.search(r"^(\[rank0\]: )?RuntimeError: .*(timed out|timeout)", proc.stderr,
                     re.IGNORECASE | re.MULTILINE), "rank 0 must fail by the timeout"
    assert elapsed < 5 + 40, f"took {elapsed:.1f}s"
