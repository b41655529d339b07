"""The lab runner on a fake experiment (no training): resumable, lossless, parallel,
never mixing results, and clear errors."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bnlab.errors import BnlabError
from bnlab.experiments import runner, scheduler
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunContext,
    RunFunction,
    RunOutput,
    RunResult,
    RunSpec,
)
from bnlab.experiments.report import write_report
from bnlab.experiments.verdict import compare
from bnlab.train import TrainConfig


@dataclass(frozen=True)
class FakeConfig:
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    sleep_s: float = 0.0


class Fake(Experiment):
    """Each run 'trains' instantly: accuracy = 0.9 + lr / 10; it logs every execution."""

    name = "fake"
    claim = "Higher learning rates give higher accuracy."
    seeds = "none"
    rule = "supported if acc(lr max) - acc(lr min) >= 1 point beyond 2 SE."
    profiles: ClassVar[dict[str, FakeConfig]] = {
        "smoke": FakeConfig(seeds=(0, 1), lrs=(0.1, 0.5)),
        "quick": FakeConfig(seeds=(0, 1, 2), lrs=(0.1, 0.5)),
        "full": FakeConfig(seeds=(0, 1, 2), lrs=(0.1, 0.3, 0.5)),
    }
    warm_up = False
    log: Path = Path("unset")
    fail_lr: float | None = None

    def protocol(self, cfg: FakeConfig) -> str:
        return f"lrs {list(cfg.lrs)}, seeds {list(cfg.seeds)}"

    def runs(self, cfg: FakeConfig, dataset: str) -> list[RunSpec]:
        return [RunSpec({"lr": lr}, s, TrainConfig(dataset=dataset, lr=lr, seed=s),
                        kind="fake", params={"sleep_s": cfg.sleep_s})
                for lr in cfg.lrs for s in cfg.seeds]

    def runners(self) -> dict[str, RunFunction]:
        return {"fake": self.fake_run}

    def fake_run(self, spec: RunSpec, ctx: RunContext) -> RunOutput:
        t0 = time.time()
        time.sleep(spec.params["sleep_s"])
        if spec.config.lr == self.fail_lr:
            raise RuntimeError("boom")
        with open(self.log, "a") as fh:
            fh.write(json.dumps({"id": spec.run_id(self.name), "start": t0, "end": time.time(),
                                 "threads": spec.config.threads, "ctx_threads": ctx.threads,
                                 "data": ctx.data.source, "pid": os.getpid(),
                                 "env_data_dir": os.environ.get("BNLAB_DATA_DIR")}) + "\n")
        acc = 0.9 + spec.config.lr / 10 + 0.001 * spec.seed
        metrics = [{"step": 1, "test_acc": acc / 2}, {"step": 2, "test_acc": acc}]
        return RunOutput(metrics, {"test_acc": acc, "diverged": False, "wall_time_s": 0.01})

    def analyse(self, cfg: FakeConfig, results: list[RunResult]) -> Analysis:
        lo = [r for r in results if r.spec.group["lr"] == min(cfg.lrs)]
        hi = [r for r in results if r.spec.group["lr"] == max(cfg.lrs)]
        diffs = [100 * (h.summary["test_acc"] - low.summary["test_acc"])
                 for h, low in zip(sorted(hi, key=lambda r: r.spec.seed),
                                   sorted(lo, key=lambda r: r.spec.seed), strict=True)]
        decision = compare(diffs, 1.0)
        d = decision.mean
        return Analysis(decision.verdict, f"{d:+.2f} points", {"diff_pp": d, "se_pp": decision.se},
                        [{"lr": lr, "n": len([r for r in results if r.spec.group["lr"] == lr])}
                         for lr in cfg.lrs])

    def plot(self, cfg: FakeConfig, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import curves_plot

        return [curves_plot(out_dir / "fake.png", {"all": results}, "fake")]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    exp = Fake()
    exp.log = tmp_path / "executions.jsonl"
    monkeypatch.setattr(runner, "experiment_names", lambda: ["fake"])
    monkeypatch.setattr(runner, "get_experiment", lambda name: exp)
    monkeypatch.setattr("bnlab.experiments.summary.experiment_names", lambda: ["fake"])
    return exp


def executions(exp: Fake) -> list[dict[str, Any]]:
    if not exp.log.exists():
        return []
    return [json.loads(line) for line in exp.log.read_text().splitlines()]


def lab(out: Path, **kw: Any) -> list[runner.ExperimentOutcome]:
    kw.setdefault("profile", "smoke")
    return runner.run_lab(["fake"], out=out, dataset="digits", progress=False, **kw)


def run_dirs(out: Path) -> list[Path]:
    return sorted((out / "fake" / "runs").iterdir())


def test_run_writes_results_and_rerun_skips_completed(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "lab"
    [outcome] = lab(out)
    assert outcome.verdict == "supported" and outcome.runs_done == 4
    assert len(executions(fake)) == 4
    result = json.loads((out / "fake" / "result.json").read_text())
    assert result["verdict"] == "supported" and result["profile"] == "smoke"
    assert result["effect"]["diff_pp"] == pytest.approx(4.0)
    assert result["rule"] == Fake.rule and result["plots"] == ["fake.png"]
    assert (out / "fake" / "fake.csv").read_text().splitlines()[0] == "lr,n"
    assert len(run_dirs(out)) == 4
    for d in run_dirs(out):
        assert json.loads((d / "config.json").read_text())["run_id"] == d.name
    lab(out)
    assert len(executions(fake)) == 4  # nothing redone
    again = json.loads((out / "fake" / "result.json").read_text())
    assert again["elapsed_s"] == result["elapsed_s"]  # the time of the invocation that ran


def test_runs_get_the_data_loaded_once_from_data_dir_in_their_context(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data reaches the forked runs in their RunContext, loaded once by the lab from
    ``data_dir``; no environment variable carries it (the caller's stays as it was)."""
    from bnlab.data import load_dataset

    loads: list[tuple[str, object]] = []

    def load(name: str, data_dir: object = None, **kw: Any) -> Any:
        loads.append((name, data_dir))
        return replace(load_dataset("digits"), source=f"loaded from {data_dir}")

    monkeypatch.setattr("bnlab.data.load_dataset", load)
    monkeypatch.setenv("BNLAB_DATA_DIR", "/the/callers/own")
    lab(tmp_path / "lab", data_dir=tmp_path / "data")
    assert loads == [("digits", tmp_path / "data")]
    assert {e["data"] for e in executions(fake)} == {f"loaded from {tmp_path / 'data'}"}
    assert {e["env_data_dir"] for e in executions(fake)} == {"/the/callers/own"}
    assert os.environ["BNLAB_DATA_DIR"] == "/the/callers/own"


def test_run_folder_without_summary_is_redone_from_scratch(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "lab"
    lab(out)
    victim = run_dirs(out)[1]
    (victim / "summary.json").unlink()  # what a SIGKILL mid-run leaves
    (victim / "leftover.tmp").write_text("half-written")
    lab(out)
    redone = executions(fake)[4:]
    assert [e["id"] for e in redone] == [victim.name]
    assert not (victim / "leftover.tmp").exists()
    assert (victim / "summary.json").is_file()


def test_corrupted_result_file_is_named_and_that_run_rerun(
    fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lab"
    lab(out)
    victim = run_dirs(out)[2]
    (victim / "summary.json").write_text('{"test_acc": 0.9')  # truncated JSON
    lab(out)
    err = capsys.readouterr().err
    assert f"corrupted result file {victim / 'summary.json'}" in err
    assert [e["id"] for e in executions(fake)[4:]] == [victim.name]


def test_other_profile_in_out_is_refused_unless_force(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "lab"
    lab(out)
    with pytest.raises(BnlabError, match=r"profile: 'smoke' there, 'quick' now.*--force"):
        lab(out, profile="quick")
    assert len(executions(fake)) == 4
    lab(out, profile="quick", force=True)
    assert len(run_dirs(out)) == 6  # the smoke runs are gone, not mixed in
    assert json.loads((out / "lab.json").read_text())["profile"] == "quick"


def test_changed_config_is_refused_unless_force(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "lab"
    lab(out)
    monkeypatch.setitem(Fake.profiles, "smoke", FakeConfig(seeds=(0, 1), lrs=(0.1, 0.7)))
    with pytest.raises(BnlabError, match="fake results of a different configuration"):
        lab(out)
    lab(out, force=True)
    assert len(run_dirs(out)) == 4
    assert json.loads((out / "fake" / "result.json").read_text())["config"]["lrs"] == [0.1, 0.7]


def test_same_runs_planned_by_a_config_of_another_form_are_reused(
    fake: Fake, tmp_path: Path
) -> None:
    """The run ids cover every input of every run and the analysis is redone each time, so
    a manifest whose config differs only in form (fields added or renamed) keeps its runs."""
    out = tmp_path / "lab"
    lab(out)
    path = out / "fake" / "experiment.json"
    manifest = json.loads(path.read_text())
    old_form = {k: v for k, v in manifest["config"].items() if k != "sleep_s"}
    path.write_text(json.dumps({**manifest, "config": {**old_form, "sleep_seconds": 0}}))
    lab(out)
    assert len(executions(fake)) == 4  # nothing redone
    assert json.loads(path.read_text()) == manifest  # rewritten in the current form


def test_other_bnlab_version_is_refused(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "lab"
    lab(out)
    manifest = json.loads((out / "lab.json").read_text())
    (out / "lab.json").write_text(json.dumps({**manifest, "bnlab_version": "0.0.1"}))
    with pytest.raises(BnlabError, match=r"bnlab_version: '0\.0\.1' there"):
        lab(out)


def test_non_lab_folder_is_refused(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "lab"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(BnlabError, match="holds no bnlab lab results"):
        lab(out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_jobs_run_in_parallel_with_threads_split(fake: Fake, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(Fake.profiles, "smoke", FakeConfig(seeds=(0, 1), lrs=(0.1, 0.5),
                                                           sleep_s=0.4))
    monkeypatch.setattr(scheduler, "available_cores", lambda: 4)
    lab(tmp_path / "lab", jobs=2)
    ex = sorted(executions(fake), key=lambda e: e["start"])
    assert len(ex) == 4
    # 2 jobs × 2 threads <= 4 cores, in the run's config and in its context
    assert all(e["threads"] == e["ctx_threads"] == 2 for e in ex)
    overlaps = sum(a["end"] > b["start"] for a, b in itertools.pairwise(ex))
    assert overlaps >= 1
    assert scheduler.threads_per_run(3) == 1


def test_runs_execute_in_child_processes(fake: Fake, tmp_path: Path) -> None:
    lab(tmp_path / "lab")
    pids = [e["pid"] for e in executions(fake)]
    assert len(set(pids)) == 4 and os.getpid() not in pids


def test_run_kind_dispatches_and_an_unknown_kind_is_refused_before_any_run(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def other(spec: RunSpec, ctx: RunContext) -> RunOutput:
        return RunOutput([{"step": 1, "test_acc": 0.5}], {"test_acc": 0.5, "other": True})

    runs = Fake.runs

    def mixed(self: Fake, cfg: FakeConfig, dataset: str) -> list[RunSpec]:
        specs = runs(self, cfg, dataset)
        return [replace(s, kind="other") if s.seed == 1 else s for s in specs]

    monkeypatch.setattr(Fake, "runs", mixed)
    monkeypatch.setattr(Fake, "runners", lambda self: {"fake": self.fake_run, "other": other})
    lab(tmp_path / "lab")
    summaries = [json.loads(p.read_text()) for p in
                 sorted((tmp_path / "lab").glob("fake/runs/*/summary.json"))]
    assert sum(bool(s.get("other")) for s in summaries) == 2  # the two seed-1 runs
    assert len(executions(fake)) == 2  # the seed-0 runs went to fake_run
    monkeypatch.setattr(Fake, "runners", lambda self: {"fake": self.fake_run})
    with pytest.raises(ValueError, match="a run of kind 'other', which it has no run function"):
        lab(tmp_path / "lab2")
    assert not (tmp_path / "lab2").exists()  # refused while planning


def test_failed_run_is_reported_with_its_error_file(fake: Fake, tmp_path: Path) -> None:
    fake.fail_lr = 0.5
    out = tmp_path / "lab"
    with pytest.raises(BnlabError, match=r"2 run\(s\) failed; see error\.txt"):
        lab(out)
    errors = sorted(out.glob("fake/runs/*/error.txt"))
    assert len(errors) == 2 and "RuntimeError: boom" in errors[0].read_text()
    assert not (out / "fake" / "result.json").exists()
    fake.fail_lr = None
    [outcome] = lab(out)  # the two failed runs are redone, the others kept
    assert outcome.verdict == "supported" and len(executions(fake)) == 4


def test_unknown_experiment_lists_the_valid_ones(fake: Fake, tmp_path: Path) -> None:
    with pytest.raises(BnlabError, match="unknown experiment 'nope'; expected one of: fake"):
        runner.run_lab(["nope"], out=tmp_path, progress=False)
    with pytest.raises(BnlabError, match="unknown profile 'huge'"):
        runner.run_lab(["fake"], out=tmp_path, profile="huge", progress=False)
    with pytest.raises(BnlabError, match="unknown dataset 'cifar'; expected one of: mnist"):
        runner.run_lab(["fake"], out=tmp_path, dataset="cifar", progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_report_md_and_self_contained_html(fake: Fake, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    declaration = {"quote": "Higher is better.", "section": "literature",
                   "papers": "Someone, 2020", "literature": "CIFAR-10: higher is better",
                   "practice": {"supported": "a", "not supported": "b", "inconclusive": "c"}}
    for k, v in declaration.items():
        monkeypatch.setattr(Fake, k, v)
    out = tmp_path / "lab"
    lab(out)
    # result.json carries the declaration, so a report needs only the results folder
    result = json.loads((out / "fake" / "result.json").read_text())
    assert {k: result[k] for k in declaration} == declaration
    md, page = write_report(out)
    text = md.read_text()
    assert "| Higher learning rates give higher accuracy. | [`fake`](#fake) | **supported**" in text
    assert "![fake: fake.png](fake/fake.png)" in text and Fake.rule in text
    html = page.read_text()
    assert html.count("src='data:image/png;base64,") == 1
    assert "http://" not in html and "https://" not in html
    # --out copies what the report needs, not the per-run files, under profile-dataset/
    md2, _ = write_report(out, tmp_path / "docs")
    assert (tmp_path / "docs" / "smoke-digits" / "fake" / "fake.png").is_file()
    assert not (tmp_path / "docs" / "smoke-digits" / "fake" / "runs").exists()
    assert md2.read_text() == text.replace("](fake/", "](smoke-digits/fake/")


def test_report_errors(fake: Fake, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BnlabError, match="no experiment results in"):
        write_report(tmp_path / "empty")
    out = tmp_path / "lab"
    lab(out)
    (out / "fake" / "result.json").write_text("{not json")
    with pytest.raises(BnlabError, match=f"corrupted result file {out / 'fake' / 'result.json'}"):
        write_report(out)


# --------------------------------------------------------------------------- stacked seeds


@dataclass(frozen=True)
class TinyConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    norms: tuple[str, ...] = ("bn", "none")
    model: str = "paper_mlp"
    model_kwargs: tuple[tuple[str, Any], ...] = (("width", 16),)


class Tiny(Experiment):
    """Plain training runs (kind "train", the base run function) of a small MLP on digits."""

    name = "tiny"
    claim = "BN helps."
    seeds = "none"
    rule = "whatever"
    profiles: ClassVar[dict[str, TinyConfig]] = {p: TinyConfig()
                                                 for p in ("smoke", "quick", "full")}

    def protocol(self, cfg: TinyConfig) -> str:
        return "tiny"

    def runs(self, cfg: TinyConfig, dataset: str) -> list[RunSpec]:
        return [RunSpec({"norm": n}, s, TrainConfig(
            dataset=dataset, model=cfg.model, norm=n, model_kwargs=dict(cfg.model_kwargs),
            seed=s, steps=12, eval_every=5, lr=0.05, eval_subset=100))
            for n in cfg.norms for s in cfg.seeds]

    def analyse(self, cfg: TinyConfig, results: list[RunResult]) -> Analysis:
        return Analysis("inconclusive", "n/a", {}, [{"runs": len(results)}])


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Tiny:
    """The tiny experiment as the only one; one thread per run (two OpenMP threads on a
    busy machine can be many times slower)."""
    exp = Tiny()
    monkeypatch.setattr(scheduler, "available_cores", lambda: 1)
    monkeypatch.setattr(runner, "experiment_names", lambda: ["tiny"])
    monkeypatch.setattr(runner, "get_experiment", lambda name: exp)
    return exp


def tiny_lab(out: Path, **kw: Any) -> dict[str, dict[str, Any]]:
    """Run the tiny lab; every run's summary and metrics by run id."""
    runner.run_lab(["tiny"], out=out, dataset="digits", progress=False, **kw)
    return {d.name: {"summary": json.loads((d / "summary.json").read_text()),
                     "metrics": [json.loads(line) for line in
                                 (d / "metrics.jsonl").read_text().splitlines()],
                     "mtime": (d / "summary.json").stat().st_mtime_ns}
            for d in sorted((out / "tiny" / "runs").iterdir())}


def tasks_of(exp: Experiment, cfg: Any, **kw: Any) -> list[list[tuple[str, int]]]:
    [p] = runner.plan([exp.name], "smoke", "digits", Path("unused"))
    return [[(r.spec.group["norm"], r.spec.seed) for r in t]
            for t in runner.group_runs(p, p.runs, **kw)]


def test_train_runs_differing_only_by_seed_are_grouped_up_to_the_cap(
        tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny.config("smoke")
    bn = [("bn", s) for s in cfg.seeds]
    no = [("none", s) for s in cfg.seeds]
    assert tasks_of(tiny, cfg) == [bn, no]
    assert tasks_of(tiny, cfg, stack=False) == [[r] for r in bn + no]
    monkeypatch.setattr("bnlab.train.stacked.MAX_STACK", 2)
    assert tasks_of(tiny, cfg) == [bn[:2], bn[2:], no[:2], no[2:]]


def test_runs_the_engine_cannot_prove_exact_are_not_grouped(
        tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout (random masks per seed), convolutions (exact, but slower stacked), another
    run kind, or an experiment's own "train" function: one run per task."""
    for cfg in (TinyConfig(model="deep_mlp", model_kwargs=(("width", 8), ("dropout", 0.5))),
                TinyConfig(model="seed_cnn", model_kwargs=())):
        monkeypatch.setitem(Tiny.profiles, "smoke", cfg)
        assert all(len(t) == 1 for t in tasks_of(tiny, cfg))
    monkeypatch.setitem(Tiny.profiles, "smoke", TinyConfig())
    monkeypatch.setattr(Tiny, "runners", lambda self: {"train": lambda s, c: None})
    assert all(len(t) == 1 for t in tasks_of(tiny, TinyConfig()))
    runs = Tiny.runs
    monkeypatch.setattr(Tiny, "runs", lambda self, cfg, dataset: [
        replace(s, kind="probe") for s in runs(self, cfg, dataset)])
    monkeypatch.setattr(Tiny, "runners", lambda self: {"probe": lambda s, c: None})
    assert all(len(t) == 1 for t in tasks_of(tiny, TinyConfig()))


def test_stacked_runs_write_the_same_folders_as_separate_runs(
        tiny: Tiny, tmp_path: Path) -> None:
    """Same run ids, the same metrics rows (float32 rounding apart), each run's share of
    the group's time and ``stacked: 3``; a run of a killed group is redone alone, once."""
    stacked = tiny_lab(tmp_path / "stacked")
    alone = tiny_lab(tmp_path / "alone", stack=False)
    assert stacked.keys() == alone.keys() and len(stacked) == 6
    for run_id, s in stacked.items():
        a = alone[run_id]
        assert s["summary"]["stacked"] == 3 and "stacked" not in a["summary"]
        assert s["summary"]["wall_time_s"] > 0
        assert [r["step"] for r in s["metrics"]] == [r["step"] for r in a["metrics"]] \
            == [5, 10, 12]
        for rs, ra in zip(s["metrics"], a["metrics"], strict=True):
            assert rs["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-5)
            assert rs["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
            assert abs(rs["test_acc"] - ra["test_acc"]) * rs["test_n"] <= 1
        assert s["summary"]["config"] == a["summary"]["config"]
    victim = sorted(stacked)[1]
    (tmp_path / "stacked" / "tiny" / "runs" / victim / "summary.json").unlink()
    again = tiny_lab(tmp_path / "stacked")
    assert [k for k in again if again[k]["mtime"] != stacked[k]["mtime"]] == [victim]
    assert "stacked" not in again[victim]["summary"]  # the group's last run, trained alone


def test_a_failed_group_leaves_an_error_in_each_of_its_runs(
        tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(configs: Any, data: Any) -> Any:
        raise RuntimeError("stacked boom")

    monkeypatch.setattr("bnlab.train.stacked.train_stacked", boom)
    monkeypatch.setattr(Tiny, "warm_up", False)  # the warm-up would call it here
    with pytest.raises(BnlabError, match=r"6 run\(s\) failed"):
        runner.run_lab(["tiny"], out=tmp_path / "lab", dataset="digits", progress=False)
    errors = sorted((tmp_path / "lab").glob("tiny/runs/*/error.txt"))
    assert len(errors) == 6 and all("stacked boom" in e.read_text() for e in errors)
    assert not list((tmp_path / "lab").glob("tiny/runs/*/summary.json"))
