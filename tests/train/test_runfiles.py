"""The run folder: one writer and one reader, for train, the lab and older bnlab's folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.train import TrainConfig, build, load_checkpoint, read_run, write_run
from bnlab.train.runfiles import RunFileError, RunWriter

FIXTURE_RUN = Path(__file__).parent.parent / "fixtures" / "run_7808d2f"


def test_reads_a_run_folder_written_by_7808d2f() -> None:
    files = read_run(FIXTURE_RUN)
    assert files is not None
    assert [m["step"] for m in files.metrics] == [2, 4]
    assert files.summary["steps"] == 4 and files.summary["test_acc"] == files.metrics[-1][
        "test_acc"]
    assert files.checkpoint == FIXTURE_RUN / "model.safetensors"
    assert load_checkpoint(files.checkpoint)[1] == TrainConfig.from_dict(
        files.summary["config"])


def test_writer_and_reader_agree(tmp_path: Path) -> None:
    config = TrainConfig(model="deep_mlp", dataset="digits", model_kwargs={"width": 4})
    writer = RunWriter(tmp_path / "run")
    writer.start()
    rows = [{"step": 1, "test_acc": 0.5, "train_loss": None}, {"step": 2, "test_acc": 0.75}]
    for row in rows:
        writer.append(row)
    assert read_run(tmp_path / "run") is None  # no summary yet: not complete
    name = writer.save_model(build(config), config, (1, 8, 8), 10)
    writer.finish({"test_acc": 0.75, "checkpoint": name})
    files = read_run(tmp_path / "run")
    assert files is not None and files.metrics == rows
    assert files.summary == {"test_acc": 0.75, "checkpoint": "model.safetensors"}
    assert files.checkpoint is not None and load_checkpoint(files.checkpoint)[1] == config
    writer.start()  # a rerun (overwrite) removes the previous run's files, only ours
    (tmp_path / "run" / "notes.txt").write_text("mine")
    writer.start()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_write_run_puts_extra_in_the_summary(tmp_path: Path) -> None:
    write_run(tmp_path, [{"step": 3, "test_acc": float("nan")}], {"test_acc": 0.1},
              {"grad_norm_init": 2.5})
    files = read_run(tmp_path)
    assert files is not None and files.summary == {"test_acc": 0.1, "grad_norm_init": 2.5}
    assert torch.isnan(torch.tensor(files.metrics[0]["test_acc"]))


@pytest.mark.parametrize("broken,text,match", [
    ("summary.json", '{"test_acc": 0.9', "summary.json: not valid JSON"),
    ("summary.json", '{"steps": 3}', "not a run summary"),
    ("metrics.jsonl", '{"step": 1}\n{"st', "line 2 is not valid JSON"),
    ("metrics.jsonl", '[1, 2]\n', "line 1 is not a JSON object"),
])
def test_broken_files_are_named(tmp_path: Path, broken: str, text: str, match: str) -> None:
    write_run(tmp_path, [{"step": 1}], {"test_acc": 0.5})
    (tmp_path / broken).write_text(text)
    with pytest.raises(RunFileError, match=match) as info:
        read_run(tmp_path)
    assert info.value.path == tmp_path / broken
