"""The whole lab on real MNIST with the smoke profile: SIGKILL mid-run, rerun, every run
exactly once; verdicts, CSVs and plots for all nine claims; the report; the CLI's errors.

One smoke lab is run per module (it is the expensive part) and shared by the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.experiments import experiment_names, get_experiment
from bnlab.experiments.base import VERDICTS
from bnlab.experiments.runner import group_runs, plan

NAMES = experiment_names()


def _data_dir() -> Path:
    env = os.environ.get("BNLAB_DATA_DIR")
    if env and (Path(env) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        return Path(env)
    if os.environ.get("CI"):
        pytest.fail("CI must run the MNIST tests: set BNLAB_DATA_DIR to the shared datasets")
    pytest.skip("MNIST files not found: set BNLAB_DATA_DIR to a folder with mnist/")


def _summaries(out: Path) -> list[Path]:
    return sorted(out.glob("*/runs/*/summary.json"))


@pytest.fixture(scope="module")
def smoke_lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``bnlab experiment all --profile smoke --jobs 2``, SIGKILLed after a few runs,
    then rerun to completion. Returns the folder and what was seen at the kill."""
    data = _data_dir()
    out = tmp_path_factory.mktemp("lab") / "out"
    cmd = [sys.executable, "-m", "bnlab", "experiment", "all", "--profile", "smoke",
           "--jobs", "2", "--out", str(out)]
    env = {**os.environ, "BNLAB_DATA_DIR": str(data)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_summaries(out)) < 6:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"lab ended or stalled before the kill: {proc.stderr.read()!r}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    in_flight = [d for d in out.glob("*/runs/*") if not (d / "summary.json").exists()]
    time.sleep(1.0)  # an orphaned child would go on and finish its run meanwhile
    finished_after_kill = [d for d in in_flight if (d / "summary.json").exists()]
    completed = {p: p.stat().st_mtime_ns for p in _summaries(out)}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    return {"out": out, "completed": completed, "late": finished_after_kill,
            "stdout": rerun.stdout}


def test_sigkill_then_rerun_gives_every_run_exactly_once(
    mnist_dir: Path, smoke_lab: dict[str, object]
) -> None:
    out = smoke_lab["out"]
    assert isinstance(out, Path)
    completed = smoke_lab["completed"]
    assert isinstance(completed, dict) and len(completed) >= 6
    stacked = 0
    # the runs in flight died with the parent (PR_SET_PDEATHSIG): none finished after it
    assert smoke_lab["late"] == []
    # completed runs were kept, not redone
    for path, mtime in completed.items():
        assert path.stat().st_mtime_ns == mtime, path
    stackable = 0
    for p in plan(NAMES, "smoke", "mnist", out):
        planned = {r.run_dir for r in p.runs}
        on_disk = set((out / p.experiment.name / "runs").iterdir())
        assert on_disk == planned, p.experiment.name
        stackable += sum(len(t) for t in group_runs(p, p.runs) if len(t) > 1)
        for run in p.runs:
            config = json.loads((run.run_dir / "config.json").read_text())
            assert config["run_id"] == run.run_id
            summary = json.loads((run.run_dir / "summary.json").read_text())
            assert summary["wall_time_s"] >= 0, run.run_dir  # what every run kind writes
            stacked += summary.get("stacked", 1) > 1
            steps = [json.loads(line)["step"]
                     for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
            assert steps and steps == sorted(set(steps)), run.run_dir  # no duplicated rows
    # the runner trained the seeds of a cell together where it could (a group cut by the
    # kill has its remaining runs redone on their own, or stacked again if several)
    assert stackable > 0  # the smoke profile has cells of several seeds (init-sensitivity)
    assert stacked > 0, (stacked, stackable)
    assert "total" in smoke_lab["stdout"]  # type: ignore[operator]
    for name in NAMES:
        assert name in smoke_lab["stdout"]  # type: ignore[operator]


@pytest.mark.parametrize("name", NAMES)
def test_each_claim_has_a_verdict_numbers_and_plots(
    mnist_dir: Path, smoke_lab: dict[str, object], name: str
) -> None:
    out = smoke_lab["out"]
    assert isinstance(out, Path)
    result = json.loads((out / name / "result.json").read_text())
    exp = get_experiment(name)
    assert result["verdict"] in VERDICTS
    assert result["rule"] == exp.rule and result["claim"] == exp.claim
    assert result["profile"] == "smoke" and result["table"]
    assert len(result["runs"]) == len(exp.runs(exp.config("smoke"), "mnist"))
    csv = (out / name / result["csv"]).read_text().splitlines()
    assert len(csv) == len(result["table"]) + 1
    assert result["plots"]
    for png in result["plots"]:
        assert (out / name / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_covariate_shift_numpy_core_reproduces_torch(
    mnist_dir: Path, smoke_lab: dict[str, object]
) -> None:
    out = smoke_lab["out"]
    assert isinstance(out, Path)
    result = json.loads((out / "covariate-shift" / "result.json").read_text())
    backends = {(r["group"]["norm"], r["group"]["backend"]) for r in result["runs"]}
    assert backends == {(n, b) for n in ("bn", "none") for b in ("torch", "numpy")}
    # same init, same batches, float32 on both sides: the curves coincide
    assert result["effect"]["max_acc_diff_pp"] <= 0.5
    assert result["effect"]["max_percentile_diff"] <= 1e-2
    assert "covariate_shift_percentiles.png" in result["plots"]


def test_report_from_the_smoke_lab(mnist_dir: Path, smoke_lab: dict[str, object],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = smoke_lab["out"]
    assert isinstance(out, Path)
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    n_plots = sum(len(json.loads((out / n / "result.json").read_text())["plots"])
                  for n in NAMES)
    assert html.count("src='data:image/png;base64,") == n_plots >= 11
    for name in NAMES:
        assert f"<section id='{name}'>" in html and f"## {name}" in md


def test_cli_refuses_mixing_profiles_and_unknown_names(
    mnist_dir: Path, smoke_lab: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    out = smoke_lab["out"]
    assert isinstance(out, Path)
    before = {p: p.stat().st_mtime_ns for p in _summaries(out)}
    assert main(["experiment", "run", "depth", "--profile", "quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "profile: 'smoke' there, 'quick' now" in err and "--force" in err
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in _summaries(out)} == before
    assert main(["experiment", "run", "depht", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'depht'; expected one of: convergence, lr-tolerance" in err


def test_cli_report_on_a_folder_without_results(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no experiment results in" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_cli_list_shows_every_name(capsys: pytest.CaptureFixture[str]) -> None:
    """Seed claims, then the literature, each in the report's order (the full set of names:
    this fails until every experiment is registered)."""
    assert main(["experiment", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    claims = ["convergence", "lr-tolerance", "depth", "init-sensitivity", "regularization",
              "placement", "covariate-shift", "train-eval", "batch-size", "weight-decay",
              "dropout", "input-scale", "gradient-health", "hyperparameters",
              "batch-vs-dataset"]
    literature = ["santurkar-2018", "yang-2019", "bjorck-2018", "wu-johnson-2021"]
    assert [line.split()[0] for line in lines] == [
        "Seed", *claims, "Literature:", *literature]
    assert lines[0] == "Seed claims:"
