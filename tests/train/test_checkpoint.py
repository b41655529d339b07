"""The checkpoint format: files written by older bnlab still load; plain and folded round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bnlab.errors import BnlabError
from bnlab.train import TrainConfig, build, load_checkpoint, load_folded, save_checkpoint
from bnlab.train.checkpoint import FOLDED, read_checkpoint_info

FIXTURES = Path(__file__).parent.parent / "fixtures"
PLAIN = FIXTURES / "run_7808d2f" / "model.safetensors"
FOLDED_FILE = FIXTURES / "folded_7808d2f.safetensors"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "expected_7808d2f.safetensors"))


def test_checkpoint_written_by_7808d2f_loads_and_gives_the_same_output(expected) -> None:
    model, config = load_checkpoint(PLAIN)
    assert config.model == "deep_mlp" and config.model_kwargs == {"depth": 2, "width": 8}
    assert config.norm_kwargs == {"momentum": 0.2} and config.init_scale == 0.5
    assert not model.training
    assert model.blocks[0].norm.momentum == 0.2  # the norm options are applied
    assert int(model.blocks[0].norm.num_batches_tracked) == 4
    with torch.no_grad():
        assert torch.equal(model(expected["input"]), expected["output"])


def test_folded_file_written_by_7808d2f_loads_and_gives_the_same_output(expected) -> None:
    folded, config = load_folded(FOLDED_FILE)
    assert config == load_checkpoint(PLAIN)[1]
    assert getattr(folded, "folded_pairs", 0) == 2
    with torch.no_grad():
        assert torch.equal(folded(expected["input"]), expected["folded_output"])


def test_round_trip_keeps_tensors_config_and_metadata_keys(tmp_path: Path) -> None:
    config = TrainConfig(model="deep_mlp", norm="ghost", dataset="digits",
                         model_kwargs={"depth": 3, "width": 6}, norm_kwargs={"eps": 1e-3},
                         init_scale=2.0, seed=11)
    model = build(config)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, config)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    with safe_open(str(PLAIN), framework="pt") as fh:
        old_meta = fh.metadata()
    assert set(meta) == set(old_meta)  # the format's keys are the same as 7808d2f wrote
    assert json.loads(meta["in_shape"]) == [1, 8, 8] and meta["num_classes"] == "10"
    loaded, again = load_checkpoint(path)
    assert again == config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)


def test_folded_round_trip_and_formats_are_not_mixed(tmp_path: Path) -> None:
    from bnlab.nn import fold_bn

    config = TrainConfig(model="seed_cnn", dataset="digits")
    model = build(config).eval()
    folded = fold_bn(model)
    path = tmp_path / "f.safetensors"
    save_checkpoint(path, folded, config, format=FOLDED, folded_from="x.safetensors")
    assert read_checkpoint_info(path, formats=(FOLDED,)).metadata["folded_from"] == \
        "x.safetensors"
    again, _ = load_folded(path)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))
    with pytest.raises(BnlabError, match=r"a folded model.*load_folded"):
        load_checkpoint(path)
    with pytest.raises(BnlabError, match="not a folded checkpoint"):
        load_folded(PLAIN)
