"""`bnlab train --norm renorm|ghost`, `bnlab recalibrate` and `bnlab fold` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.cli import main
from bnlab.data import load_dataset
from bnlab.nn import GhostBatchNorm2d
from bnlab.toolkit import load_folded
from bnlab.train import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolkit")
    for norm in ("renorm", "ghost"):
        rc = main(["train", "--model", "seed_cnn", "--norm", norm, "--dataset", "digits",
                   "--steps", "5", "--eval-every", "5", "--threads", "1",
                   "--out", str(root / norm)])
        assert rc == 0
    return root


@pytest.mark.parametrize("norm", ["renorm", "ghost"])
def test_train_with_toolkit_norms(trained, norm):
    summary = json.loads((trained / norm / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["config"]["norm"] == norm
    model, _ = load_checkpoint(trained / norm / "model.safetensors")
    if norm == "ghost":
        assert any(isinstance(m, GhostBatchNorm2d) for m in model.modules())


def test_recalibrate_cli_writes_population_stats(trained, tmp_path, capsys):
    out = tmp_path / "recal.safetensors"
    rc = main(["recalibrate", str(trained / "renorm" / "model.safetensors"), "--dataset",
               "digits", "--batch-size", "100", "--num-batches", "3", "--out", str(out)])
    assert rc == 0
    assert "test accuracy" in capsys.readouterr().out
    model, _ = load_checkpoint(out)
    x = load_dataset("digits").train.tensors[0][:300]
    seen = []
    bn = model.conv1.norm
    handle = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    inp = seen[0].double()
    torch.testing.assert_close(bn.running_mean.double(), inp.mean((0, 2, 3)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(),
                               inp.transpose(0, 1).reshape(inp.shape[1], -1).var(1),
                               atol=1e-5, rtol=1e-5)


def test_fold_cli_round_trip(trained, tmp_path, capsys):
    src = trained / "ghost" / "model.safetensors"
    out = tmp_path / "folded.safetensors"
    assert main(["fold", str(src), "--out", str(out)]) == 0
    assert "folded 3" in capsys.readouterr().out
    folded, config = load_folded(out)
    model, _ = load_checkpoint(src)
    x = load_dataset("digits").test.tensors[0][:50]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert config.norm == "ghost"
    assert main(["eval", str(src), "--dataset", "digits"]) == 0
    plain = capsys.readouterr().out
    assert main(["eval", str(out), "--dataset", "digits"]) == 0
    line = capsys.readouterr().out
    assert "norm=ghost (folded), test accuracy" in line
    # folded and unfolded agree to ~1e-6 on the logits: the same accuracy, to a sample
    acc = [float(t.split("test accuracy ")[1].split(" %")[0]) for t in (plain, line)]
    assert abs(acc[0] - acc[1]) <= 100 / 360


def test_toolkit_commands_bad_input_exit_2_without_traceback(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert main(["fold", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["recalibrate", str(junk), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_folded_file_without_config_raised_keyerror_traceback(tmp_path):
    """A folded file whose header lacks the config is a clear BnlabError, not a KeyError."""
    from safetensors.torch import save_file

    from bnlab.errors import BnlabError

    path = tmp_path / "folded.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "bnlab-folded"})
    with pytest.raises(BnlabError, match="broken bnlab metadata"):
        load_folded(path)
