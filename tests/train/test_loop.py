"""The training loop: files, determinism, divergence, checkpoints, validation, real MNIST."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import load_dataset
from bnlab.errors import BnlabError
from bnlab.train import (
    TrainConfig,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    slice_bounds,
    train,
)

DIGITS = TrainConfig(dataset="digits", steps=30, eval_every=10, threads=1, lr=0.05)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_writes_metrics_checkpoint_summary(tmp_path: Path, digits) -> None:
    out = tmp_path / "run"
    result = train(DIGITS, out, progress=False, data=digits)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows == result.metrics
    for key in ("epoch", "train_loss", "test_loss", "test_acc", "lr", "wall_time_s"):
        assert all(key in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == dataclasses.asdict(DIGITS)
    assert summary["steps"] == 30 and summary["diverged"] is False
    assert summary["test_acc"] == rows[-1]["test_acc"] > 0.5
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 64
    assert summary["dataset_source"] == digits.source
    # The checkpoint rebuilds the same model: identical evaluation.
    model, config = load_checkpoint(out / "model.safetensors")
    assert config == DIGITS
    assert evaluate(model, digits.test) == evaluate(result.model, digits.test)
    assert evaluate(model, digits.test)[1] == summary["test_acc"]


def test_thread_count_is_restored(digits) -> None:
    """config.threads applies to the run only: the caller's torch thread count comes back."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(dataclasses.replace(DIGITS, steps=2, eval_every=2), progress=False, data=digits)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_deterministic(digits) -> None:
    cfg = dataclasses.replace(DIGITS, model_kwargs={"dropout": 0.2})
    a = train(cfg, progress=False, data=digits).metrics
    b = train(cfg, progress=False, data=digits).metrics
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in b]
    c = train(dataclasses.replace(cfg, seed=1), progress=False, data=digits).metrics
    assert [r["train_loss"] for r in c] != [r["train_loss"] for r in a]


def test_divergence_is_a_result(tmp_path: Path, digits) -> None:
    cfg = dataclasses.replace(DIGITS, norm="none", lr=1e4, steps=50)
    result = train(cfg, tmp_path / "run", progress=False, data=digits)
    s = result.summary
    assert s["diverged"] is True and s["steps"] < 50
    assert s["diverged_at_step"] == s["steps"] + 1
    assert result.metrics[-1]["train_loss"] is None  # NaN written as null
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is True


def test_train_subset_epochs_and_eval_train(digits) -> None:
    cfg = dataclasses.replace(DIGITS, steps=None, epochs=2, train_subset=256, eval_every=4,
                              eval_train=True, batch_size=32)
    result = train(cfg, progress=False, data=digits)
    assert result.summary["steps"] == 16 and result.summary["n_train"] == 256
    assert [r["step"] for r in result.metrics] == [4, 8, 12, 16]
    assert all(0 <= r["train_acc"] <= 1 for r in result.metrics)
    model = result.model
    _, acc = evaluate(model, torch.utils.data.TensorDataset(*[t[:256] for t in
                                                                  digits.train.tensors]))
    assert acc == result.summary["train_acc"]


def test_evaluate_restores_mode_and_leaves_stats(digits) -> None:
    model = train(DIGITS, progress=False, data=digits).model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, digits.test, batch_size=7, limit=50)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_slices_are_array_split() -> None:
    for n, w in [(64, 2), (7, 3), (5, 4), (2, 4)]:
        parts = np.array_split(np.arange(n), w)
        for r in range(w):
            lo, hi = slice_bounds(n, w, r)
            assert list(range(lo, hi)) == parts[r].tolist()


@pytest.mark.parametrize("change,match", [
    ({"model": "vgg"}, "unknown model 'vgg'"),
    ({"norm": "weird"}, "unknown norm 'weird'.*bn"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'.*sgd, adam"),
    ({"steps": 0}, "steps must be a positive"),
    ({"batch_size": -1}, "batch_size must be a positive"),
    ({"lr": 0.0}, "lr must be a positive"),
    ({"lr": float("nan")}, "lr must be a positive"),
    ({"steps": None, "epochs": None}, "set steps or epochs"),
    ({"model_kwargs": {"depth": 3}}, "does not take depth"),
    ({"batch_size": 5000}, "larger than the training set"),
])
def test_bad_config(tmp_path: Path, digits, change: dict, match: str) -> None:
    with pytest.raises(BnlabError, match=match):
        train(dataclasses.replace(DIGITS, **change), tmp_path / "out", data=digits)
    assert not (tmp_path / "out").exists()  # nothing written


def test_out_dir_rules(tmp_path: Path, digits) -> None:
    cfg = dataclasses.replace(DIGITS, steps=2, eval_every=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "other.txt").write_text("x")
    with pytest.raises(BnlabError, match=r"not empty.*--overwrite"):
        train(cfg, out, progress=False, data=digits)
    train(cfg, out, progress=False, overwrite=True, data=digits)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    train(cfg, out, progress=False, overwrite=True, data=digits)  # not appended twice
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(BnlabError, match="not a directory"):
        train(cfg, afile, data=digits)
    with pytest.raises(BnlabError, match="is a file"):
        train(cfg, afile / "sub", data=digits)


def test_bad_checkpoints(tmp_path: Path, digits) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(BnlabError, match="not a safetensors file"):
        load_checkpoint(junk)
    pickled = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, pickled)
    with pytest.raises(BnlabError, match="not a safetensors file"):
        load_checkpoint(pickled)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(BnlabError, match="no bnlab metadata"):
        load_checkpoint(plain)
    # Right metadata, wrong tensors: a no-BN model saved with a BN config.
    from bnlab.models import build_model

    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, build_model("seed_cnn", norm="none", in_shape=(1, 8, 8)), DIGITS)
    with pytest.raises(BnlabError, match="do not match model 'seed_cnn'"):
        load_checkpoint(wrong)
    with pytest.raises(BnlabError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_real_mnist_short_run(mnist_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=40, eval_every=20, eval_subset=500, threads=2)
    result = train(cfg, tmp_path / "run", progress=False, data_dir=mnist_dir)
    assert result.summary["dataset_source"] == str(mnist_dir / "mnist")
    assert result.summary["test_n"] == 500
    assert result.summary["test_acc"] > 0.8
