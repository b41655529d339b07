"""The CLI as a careless or hostile user drives it: bad arguments and paths, signals, a
closed pipe, a file-size limit, two labs on one folder, stale locks and temp files, failing
DDP workers. Each case: the documented exit code, exactly one line on stderr naming the
problem (progress lines aside), no traceback, and nothing written but what is documented."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bnlab._io import (
    WriteError,
    atomic_path,
    atomic_write,
    remove_stale_temps,
    replace_on_success,
)
from bnlab._lock import LOCK_FILE, FolderLocked, folder_lock
from bnlab.cli import main
from bnlab.distributed import FailureRecord, failure_message, launch

FAST = ["--dataset", "digits", "--steps", "2", "--eval-every", "1", "--threads", "1"]
# What a progress display prints when stderr is not a terminal ("desc: 3/7 step (0s…").
PROGRESS = re.compile(r"^.+: \d+(/\d+)? \w+ \(\d+s")


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BNLAB_MIRRORS", "")
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "BNLAB_MIRRORS": "", "OMP_NUM_THREADS": "1", **extra}
    env.pop("BNLAB_DATA_DIR", None)
    return env


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str, *expect: str, notes: int = 0) -> str:
    """The single error line of ``err`` (progress lines and ``notes`` info lines aside)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 + notes, err
    for text in expect:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: to prove nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bnlab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ck") / "run"
    train(TrainConfig(dataset="digits", steps=2, eval_every=1, threads=1), out,
          progress=False)
    return out / "model.safetensors"


# --------------------------------------------------------------------------- argparse


@pytest.mark.parametrize("argv, expect", [
    ([], "required: COMMAND"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["train", "--steps", "x"], "argument --steps: expected a whole number, got 'x'"),
    (["train", "--lr"], "argument --lr: expected one argument"),
    (["train", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["experiment"], "required: ACTION"),
    (["experiment", "run", "--jobs", "0", "placement"], "expected a positive whole number"),
    (["fold", "x.safetensors"], "required: --out"),
    (["verify", "--seed", "-1"], "expected a whole number >= 0, got -1"),
    (["bench", "--threads", "100000"], "expected at most 256 threads"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_argparse_error_is_one_line_not_the_usage(argv: list[str], expect: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    line = _one_line(err, expect)
    assert line.startswith("bnlab") and "--help'" in line


# --------------------------------------------------------------------------- bad paths


@pytest.mark.parametrize("case", [
    "train-out-proc", "train-out-dangling-symlink", "train-out-is-file", "demo-out-proc",
    "fold-out-is-dir", "fold-out-proc", "fold-out-under-file", "recalibrate-out-is-dir",
    "eval-dangling-checkpoint", "eval-checkpoint-is-dir", "experiment-out-is-file",
    "train-data-dir-is-file",
])
def test_bad_path_is_one_line_naming_it(case: str, tmp_path: Path, checkpoint: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError were
    tracebacks; each is one line naming the path and what was expected, exit 2."""
    work = tmp_path / "work"
    (work / "adir").mkdir(parents=True)
    (work / "adir" / "keep.txt").write_text("mine")
    (work / "afile").write_text("mine")
    (work / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    ck = str(checkpoint)
    argv, expect, notes = {
        "train-out-proc": (["train", *FAST, "--out", "/proc/bnlab-x/run"],
                           ["/proc/bnlab-x", "no such file or folder"], 0),
        "train-out-dangling-symlink": (["train", *FAST, "--out", str(work / "dangling")],
                                       [str(work / "dangling"), "symlink to nothing"], 0),
        "train-out-is-file": (["train", *FAST, "--out", str(work / "afile")],
                              [str(work / "afile"), "not a directory"], 0),
        "demo-out-proc": (["demo", "--dataset", "digits", "--steps", "1", "--out",
                           "/proc/bnlab-x"], ["/proc/bnlab-x", "no such file or folder"], 1),
        "fold-out-is-dir": (["fold", ck, "--out", str(work / "adir")],
                            [str(work / "adir"), "is a folder, expected a file"], 0),
        "fold-out-proc": (["fold", ck, "--out", "/proc/bnlab-x/f.safetensors"],
                          ["/proc/bnlab-x", "no such file or folder"], 0),
        "fold-out-under-file": (["fold", ck, "--out", str(work / "afile" / "f.safetensors")],
                                [str(work / "afile"), "exists and is not a folder"], 0),
        "recalibrate-out-is-dir": (["recalibrate", ck, "--num-batches", "1", "--batch-size",
                                    "8", "--out", str(work / "adir")],
                                   [str(work / "adir"), "is a folder, expected a file"], 0),
        "eval-dangling-checkpoint": (["eval", str(work / "dangling")],
                                     [str(work / "dangling"), "not found"], 0),
        "eval-checkpoint-is-dir": (["eval", str(work / "adir")],
                                   [str(work / "adir"), "not found"], 0),
        "experiment-out-is-file": (["experiment", "run", "placement", "--profile", "smoke",
                                    "--dataset", "digits", "--out", str(work / "afile")],
                                   [str(work / "afile"), "not a folder"], 0),
        "train-data-dir-is-file": (["train", "--steps", "1", "--data-dir", str(work / "afile")],
                                   [str(work / "afile" / "mnist"), "offline"], 0),
    }[case]
    before = _tree(work)
    code, _, err = _cli(argv, capsys)
    assert code == 2, err
    line = _one_line(err, *expect, notes=notes)
    assert line.startswith(f"bnlab {argv[0]}: error: ")
    assert _tree(work) == before  # nothing written, nothing removed
    assert not (tmp_path / "nowhere").exists()


def test_report_out_pointing_at_a_file(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    lab = tmp_path / "lab"
    (lab / "placement").mkdir(parents=True)
    (lab / "placement" / "result.json").write_text(json.dumps(
        {"name": "placement", "verdict": "supported", "claim": "c", "table": [], "plots": []}))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        code, _, err = _cli(["report", str(lab), "--out", str(out)], capsys)
        assert code == 2
        line = _one_line(err, str(afile))
        assert re.search(r"a part of the path is a file|exists and is not a folder", line)
    assert afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "lab"]


# --------------------------------------------------------------------------- signals, pipes


def test_closed_stdout_ends_quietly(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`bnlab experiment list | head -1` with head gone before bnlab writes (its read end
    closed at once): was a BrokenPipeError traceback; now silent, exit 141 (128 + SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", broken)
    try:
        code = main(["experiment", "list"])
        broken.write("more output after the reader left")
        broken.flush()  # stdout now goes to /dev/null: the interpreter's exit flush is safe
    finally:
        monkeypatch.undo()
        broken.close()
    assert code == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""


def test_sigterm_is_like_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM used to end `bnlab train` silently; now it prints "interrupted (SIGTERM)"
    after the same cleanup as Ctrl-C, and exits 143. The run is incomplete: metrics.jsonl
    (what was evaluated so far), no summary.json, no checkpoint, no temp file."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    stop = threading.Event()

    def terminate_once_training() -> None:
        # only once the run writes metrics, so main()'s handler is surely installed
        while not stop.is_set():
            if metrics.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=terminate_once_training, daemon=True)
    killer.start()
    try:
        code, _, err = _cli(["train", "--dataset", "digits", "--steps", "100000",
                             "--eval-every", "5", "--eval-subset", "32", "--threads", "1",
                             "--out", str(out)], capsys)
    finally:
        stop.set()
        killer.join()
    assert code == 128 + signal.SIGTERM, err
    assert _one_line(err) == "bnlab train: interrupted (SIGTERM)"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_file_size_limit_while_saving_says_what_is_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RLIMIT_FSIZE below the checkpoint's size (SIGXFSZ ignored, so writes fail with EFBIG):
    was a SafetensorError traceback; now one line, exit 2, the partial temp file removed."""
    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code, _, err = _cli(["train", *FAST, "--out", str(out)], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2, err
    _one_line(err, f"cannot write {out / 'model.safetensors'}: the file-size limit",
              "no model.safetensors was written", "partial temporary file was removed")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("how", ["oserror", "safetensors-text"])
def test_disk_full_while_writing_keeps_the_previous_file(tmp_path: Path, how: str) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def fail(fh: object) -> None:
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        # how safetensors' Rust side words it
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")

    with pytest.raises(WriteError, match=r"no space left on the device; the previous "
                       r"model\.safetensors is intact, and the partial temporary file was "
                       r"removed"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="unrelated"), atomic_path(target):
        raise RuntimeError("unrelated")  # other errors pass through unchanged


# --------------------------------------------------------------------------- locks


_HOLD = textwrap.dedent(
    """
    import sys
    from bnlab._lock import folder_lock
    with folder_lock(sys.argv[1], "bnlab experiment"):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_second_lab_on_the_same_folder_refuses_with_the_holders_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `bnlab experiment` on one --out used to both run (and delete each other's run
    folders); the second now refuses, naming the first's PID, and touches nothing."""
    lab = tmp_path / "lab"
    (lab / "placement").mkdir(parents=True)
    (lab / "lab.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lab)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = _tree(lab)
        # --force: this run would delete the folder's results if it went ahead
        code, _, err = _cli(["experiment", "run", "placement", "--profile", "smoke",
                             "--dataset", "digits", "--force", "--out", str(lab)], capsys)
        assert code == 2
        _one_line(err, f"{lab} is in use by another bnlab process (PID {holder.pid}, "
                  "bnlab experiment, since ")
        assert _tree(lab) == before and (lab / "placement").is_dir()
    finally:
        holder.communicate("", timeout=30)
    assert not (lab / LOCK_FILE).exists()  # released


def test_stale_lock_and_stale_temp_files_of_a_killed_lab_are_cleaned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab killed with SIGKILL leaves its lock file and maybe temp files; the next run
    takes the lock over (with a note naming the dead PID), removes those temp files, and
    releases the lock even when it then fails (here: MNIST offline)."""
    lab = tmp_path / "lab"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lab)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    stale = lab / f".lab.json.{holder.pid}.abcdefgh.tmp"
    stale.write_text("{")
    holder.kill()
    holder.wait(timeout=30)
    assert json.loads((lab / LOCK_FILE).read_text())["pid"] == holder.pid
    code, _, err = _cli(["experiment", "run", "placement", "--profile", "smoke",
                         "--dataset", "mnist", "--out", str(lab)], capsys)
    assert code == 2
    _one_line(err, "mnist not found", notes=1)
    assert err.startswith(f"bnlab: note: took over the lock of {lab} left by PID "
                          f"{holder.pid}, bnlab experiment, since ")
    assert "which is no longer running" in err.splitlines()[0]
    assert not stale.exists() and not (lab / LOCK_FILE).exists()
    assert (lab / "lab.json").is_file()  # the lab's own manifest, as before a failed preload


def test_folder_lock_refuses_a_second_holder_and_releases_on_error(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "a"
    with pytest.raises(KeyError), folder_lock(folder, "bnlab train"):
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "bnlab train"
        # another open of the lock file (as another process would) is refused
        with pytest.raises(FolderLocked, match=rf"PID {os.getpid()}, bnlab train"), \
                folder_lock(folder):
            pass
        raise KeyError("boom")
    assert not folder.exists()  # created by the lock, still empty: removed again
    (tmp_path / "afile").write_text("x")
    with pytest.raises(Exception, match="exists and is not a folder"), \
            folder_lock(tmp_path / "afile"):
        pass


def test_training_out_folder_with_only_stale_temp_files_is_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed while writing its checkpoint leaves `.model.safetensors.<pid>.*.tmp`;
    the next run of that --out removes it instead of refusing a "non-empty" folder."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / f".model.safetensors.{dead.pid}.k3j4h5g6.tmp").write_bytes(b"partial")
    code, _, err = _cli(["train", *FAST, "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.safetensors",
                                                     "summary.json"]


def test_temp_names_carry_the_pid_and_only_dead_writers_are_cleaned(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "f.json") as tmp:
        assert re.fullmatch(rf"\.f\.json\.{os.getpid()}\.[a-z0-9_]{{8}}\.tmp", tmp.name)
        assert remove_stale_temps(tmp_path) == []  # ours, alive
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# --------------------------------------------------------------------------- --overwrite


FILES = ("metrics.jsonl", "model.safetensors", "summary.json")


def _old_run(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (folder / name).write_text(f"old {name}")
    (folder / "notes.txt").write_text("the user's")


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_overwrite_keeps_the_old_run_until_the_new_one_completes(tmp_path: Path,
                                                                 failure: type) -> None:
    run = tmp_path / "run"
    _old_run(run)
    with pytest.raises(failure), replace_on_success(run, FILES) as staging:
        (staging / "metrics.jsonl").write_text("new, partial")
        raise failure()
    assert {n: (run / n).read_text() for n in FILES} == {n: f"old {n}" for n in FILES}
    assert sorted(p.name for p in run.iterdir()) == sorted([*FILES, "notes.txt"])


def test_overwrite_replaces_the_old_run_when_the_new_one_completed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _old_run(run)
    with replace_on_success(run, FILES) as staging:
        assert staging.parent == run and list(staging.iterdir()) == []
        for name in ("metrics.jsonl", "summary.json"):  # this run wrote no checkpoint
            (staging / name).write_text(f"new {name}")
        assert (run / "summary.json").read_text() == "old summary.json"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "notes.txt",
                                                     "summary.json"]
    assert (run / "summary.json").read_text() == "new summary.json"
    assert (run / "notes.txt").read_text() == "the user's"


# --------------------------------------------------------------------------- DDP


_KILL_AT_STEP_3 = textwrap.dedent(
    """
    import os, signal
    if os.environ.get("RANK") == "1":
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        calls = [0]
        def hook(optimizer, args, kwargs):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        register_optimizer_step_pre_hook(hook)
    """
)
DDP = ["train", "--model", "seed_cnn", "--dataset", "digits", "--steps", "20",
       "--eval-every", "1", "--eval-subset", "64", "--threads", "1", "--nproc", "2"]


@pytest.mark.slow
def test_worker_killed_by_sigkill_is_named_first(tmp_path: Path) -> None:
    """Rank 1 dies of SIGKILL at step 3; rank 0's collective then breaks and it raises.
    The launcher saw rank 1 exit first, so rank 1 is named first (it used to be second)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_KILL_AT_STEP_3)
    proc = subprocess.run([sys.executable, "-m", "bnlab", *DDP, "--dist-timeout", "30"],
                          capture_output=True, text=True, timeout=120,
                          env=_env(PYTHONPATH=os.pathsep.join([str(site), *sys.path])))
    assert proc.returncode == 1
    summary = [line for line in proc.stderr.splitlines() if line.startswith("bnlab: rank")]
    assert summary[0] == ("bnlab: rank 1 failed: it was killed by SIGKILL (first failure; it "
                          "died of the signal without raising)"), proc.stderr[-3000:]


@pytest.mark.slow
def test_bad_input_under_nproc_is_one_line(tmp_path: Path) -> None:
    """Each worker refuses the same bad input; the launcher prints it once, and nothing of
    torchrun's teardown (was: each worker's line, torchrun's log, two summary lines)."""
    proc = subprocess.run([sys.executable, "-m", "bnlab", *DDP, "--norm", "zz"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    assert _one_line(proc.stderr, "unknown norm 'zz'").startswith("bnlab train: error: ")


def test_dist_timeout_failure_names_the_timeout_as_the_cause() -> None:
    class Failure:
        def __init__(self, exitcode: int, pid: int) -> None:
            self.exitcode, self.pid, self.timestamp = exitcode, pid, 100

        def signal_name(self) -> str:
            return signal.Signals(-self.exitcode).name

    records = {0: FailureRecord(5.0, "DistStoreError: wait timeout after 10ms, keys: /x")}
    text = failure_message({0: Failure(1, 11), 1: Failure(-15, 12)}, nproc=2, records=records,
                           timeout_s=0.01)
    first = text.splitlines()[0]
    assert first.startswith("bnlab: rank 0 failed: it exited with code 1 (first failure; it "
                            "raised DistStoreError: wait timeout")
    assert "(--dist-timeout) is 0.01 s: it bounds the start-up rendezvous" in first
    with pytest.raises(Exception, match="--dist-timeout must be positive seconds below 1e"):
        launch(2, ["train"], timeout_s=1e12)
