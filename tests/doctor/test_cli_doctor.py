"""`bnlab doctor` end to end: stale statistics on a real checkpoint (numbers equal to
`bnlab recalibrate`'s), exit codes, outputs, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bnlab.cli import main


def _perturb(src, dst, scale=1.6, seed=0):
    """Copy a bnlab checkpoint with its conv/linear weights perturbed (statistics stale)."""
    g = torch.Generator().manual_seed(seed)
    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    for k, v in state.items():
        if k.endswith("layer.weight"):
            state[k] = v * scale + 0.3 * v.std() * torch.randn(v.shape, generator=g)
    save_file(state, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    rc = main(["train", "--model", "seed_cnn", "--dataset", "digits", "--steps", "60",
               "--eval-every", "60", "--threads", "1", "--lr", "0.05",
               "--out", str(root / "run")])
    assert rc == 0
    stale = root / "stale.safetensors"
    _perturb(root / "run" / "model.safetensors", stale)
    return root / "run" / "model.safetensors", stale


def test_doctor_reports_the_gap_and_matches_bnlab_recalibrate(checkpoint, tmp_path, capsys,
                                                             single_threaded):
    _, stale = checkpoint
    args = ["--num-batches", "5", "--batch-size", "64"]
    rc = main(["doctor", str(stale), "--data", "digits", *args, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1
    found = [f for f in report["findings"] if f["code"] == "stale_stats"]
    assert found and found[0]["severity"] == "warning" and found[0]["remedy"] == "recalibrate"
    before, after = found[0]["effect"]["accuracy"]
    assert after > before
    assert main(["recalibrate", str(stale), "--dataset", "digits", *args,
                 "--out", str(tmp_path / "r.safetensors")]) == 0
    line = capsys.readouterr().out
    by_hand = [float(v) for v in re.findall(r"([\d.]+) %", line)]
    assert by_hand == [round(100 * before, 2), round(100 * after, 2)], line


def test_doctor_table_html_and_fail_on(checkpoint, tmp_path, capsys, single_threaded):
    good, _ = checkpoint
    page = tmp_path / "doctor.html"
    rc = main(["doctor", str(good), "--data", "digits", "--num-batches", "3",
               "--batch-size", "64", "--html", str(page), "--fail-on", "error"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "severity | layer" in out and "bias right before BN" in out
    text = page.read_text()
    assert "data:image/png;base64," in text and "conv2.norm" in text
    # Static checks only: the stock model's biases are 'info'.
    assert main(["doctor", "bnlab.models:SeedCNN"]) == 0
    assert main(["doctor", "bnlab.models:SeedCNN", "--fail-on", "info"]) == 1


@pytest.mark.parametrize("case", ["pickle", "not_bnlab", "not_module", "nothing", "shape"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    if case == "pickle":
        path = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(2)}, path)
        argv, expect = [str(path)], "torch pickle"
    elif case == "not_bnlab":
        path = tmp_path / "other.safetensors"
        save_file({"w": torch.zeros(2)}, str(path))
        argv, expect = [str(path)], "no bnlab metadata"
    elif case == "not_module":
        argv, expect = ["math:pi"], "not a torch.nn.Module"
    elif case == "nothing":
        argv, expect = [str(tmp_path / "missing")], "not an import string"
    else:
        argv, expect = ["bnlab.models:SeedCNN", "--data", "digits"], "cannot run on the data"
    rc = main(["doctor", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.mnist
@pytest.mark.slow
def test_doctor_on_mnist_matches_bnlab_recalibrate(mnist_dir, tmp_path, capsys,
                                                   single_threaded):
    """Acceptance on real data: seed_cnn trained briefly on MNIST, weights perturbed."""
    data = ["--data-dir", str(mnist_dir), "--no-download"]
    assert main(["train", "--model", "seed_cnn", "--steps", "30", "--train-subset", "2000",
                 "--eval-every", "30", "--eval-subset", "200", "--threads", "1", *data,
                 "--out", str(tmp_path / "run")]) == 0
    stale = tmp_path / "stale.safetensors"
    _perturb(tmp_path / "run" / "model.safetensors", stale)
    capsys.readouterr()
    args = ["--num-batches", "4", "--batch-size", "128"]
    assert main(["doctor", str(stale), "--data", "mnist", *data, *args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = [f for f in report["findings"] if f["code"] == "stale_stats"]
    assert found and found[0]["severity"] == "warning"
    before, after = found[0]["effect"]["accuracy"]
    assert after > before
    assert main(["recalibrate", str(stale), "--dataset", "mnist", *data, *args,
                 "--out", str(tmp_path / "r.safetensors")]) == 0
    by_hand = [float(v) for v in re.findall(r"([\d.]+) %", capsys.readouterr().out)]
    assert by_hand == [round(100 * before, 2), round(100 * after, 2)]
