"""`bnlab train | eval | models | demo` from the command line: results and bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.cli import main

FAST = ["--dataset", "digits", "--steps", "6", "--eval-every", "3", "--threads", "1"]


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real `python -m bnlab` process: exit code, stdout, stderr as a user sees them."""
    full_env = {**os.environ, "BNLAB_MIRRORS": "http://127.0.0.1:9/", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bnlab", *argv], capture_output=True,
                          text=True, env=full_env, timeout=120)


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), "--model-arg", "dropout=0.1"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "wall time" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model_kwargs"] == {"dropout": 0.1}
    assert main(["eval", str(out / "model.safetensors")]) == 0
    line = capsys.readouterr().out
    assert f"test accuracy {100 * summary['test_acc']:.2f} %" in line


def test_models_lists_param_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "seed_cnn" in text and "422,090" in text and "paper_mlp" in text


def _corrupt_data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(4)))
    return tmp_path / "data"


@pytest.mark.parametrize("case", [
    "unknown-model", "unknown-norm", "unknown-dataset", "unknown-optimizer", "zero-steps",
    "negative-lr", "zero-batch", "out-not-empty", "out-under-file", "offline",
    "corrupt-data", "bad-checkpoint", "steps-and-epochs",
])
def test_bad_input_exit_2_no_traceback(tmp_path: Path, case: str,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "out"
    argv, expect = {
        "unknown-model": (["train", *FAST, "--model", "vgg"], "seed_cnn"),
        "unknown-norm": (["train", *FAST, "--norm", "zz"], "none, bn"),
        "unknown-dataset": (["train", "--dataset", "svhn"], "mnist, fashion-mnist, digits"),
        "unknown-optimizer": (["train", *FAST, "--optimizer", "rmsprop"], "sgd, adam"),
        "zero-steps": (["train", "--steps", "0"], "positive"),
        "negative-lr": (["train", "--lr", "-1"], "positive"),
        "zero-batch": (["train", "--batch-size", "0"], "positive"),
        "out-not-empty": (["train", *FAST, "--out", str(full)], "not empty"),
        "out-under-file": (["train", *FAST, "--out", str(afile / "x")], "is a file"),
        "offline": (["train", "--data-dir", str(tmp_path / "none"), "--out", str(out)],
                    "looked in"),
        "corrupt-data": (["train", "--data-dir", str(_corrupt_data_dir(tmp_path)),
                          "--out", str(out)], "SHA-256 mismatch"),
        "bad-checkpoint": (["eval", str(afile)], "not a safetensors file"),
        "steps-and-epochs": (["train", "--steps", "3", "--epochs", "1"], "not allowed"),
    }[case]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BNLAB_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "cache" / "bnlab" / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_offline_in_a_real_process(tmp_path: Path) -> None:
    """What a user sees: one clear message on stderr, exit 2, no traceback."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "BNLAB_DATA_DIR": ""}
    proc = run_cli("train", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bnlab train: error: mnist not found")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "o").exists()


def test_divergence_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *FAST, "--norm", "none", "--lr", "10000", "--out",
                 str(tmp_path / "r")]) == 0
    assert "DIVERGED" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["diverged"] is True


def test_nproc_workers_get_the_config_as_json(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--nproc hands the workers a JSON job file (config and run options) in the launcher's
    temporary folder; a worker's `train --job FILE` runs exactly the launcher's config."""
    from bnlab.cli import build_parser
    from bnlab.train._cli import config_from_args, read_job

    argv = ["train", "--model", "deep_mlp", "--model-arg", "depth=3", "--norm-arg",
            "momentum=0.01", "--sync-bn", "--nproc", "2", "--lr", "0.1", "--epochs", "1.5",
            "--dist-timeout", "7", "--seed", "5", "--out", str(tmp_path / "o"),
            "--no-download", "--eval-train"]
    seen: dict = {}

    def fake_run(args) -> None:  # torchrun's entry point: record what the workers get
        worker_argv = args.training_script_args
        seen["argv"] = worker_argv
        seen["job"] = read_job(worker_argv[worker_argv.index("--job") + 1])
        seen["worker"] = build_parser().parse_args(worker_argv)

    monkeypatch.setattr("torch.distributed.run.run", fake_run)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(argv) == 0
    expected = config_from_args(build_parser().parse_args(argv))
    config, options = seen["job"]
    assert config == expected and config.epochs == 1.5 and config.steps is None
    assert config.model_kwargs == {"depth": 3} and config.norm_kwargs == {"momentum": 0.01}
    assert options == {"out": str(tmp_path / "o"), "overwrite": False, "data_dir": None,
                       "download": False}
    assert seen["argv"][0] == "train" and "--nproc" not in seen["argv"]
    assert seen["worker"].job is not None
    assert not Path(seen["argv"][-1]).exists()  # the launcher's folder is gone afterwards


@pytest.mark.parametrize("norm_args,expect", [
    (["--norm-arg", "momentum=abc"], "momentum must be a number in [0, 1] or None"),
    (["--norm-arg", "eps=-1"], "eps must be a positive finite number"),
    (["--norm", "gn", "--norm-arg", "groups=0"], "groups must be a positive whole number"),
])
def test_bad_norm_option_value_was_a_traceback_mid_run(
    tmp_path: Path, norm_args: list[str], expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch's norm layers accept any option value and failed at the first step with a
    traceback (ZeroDivisionError for gn groups=0); now: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    assert main(["train", *FAST, *norm_args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not out.exists()
