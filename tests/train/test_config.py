"""TrainConfig declared once: flags generated from it, JSON round trip, validation."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from bnlab.cli import build_parser
from bnlab.train import ConfigError, TrainConfig, validate_config
from bnlab.train._cli import config_from_args, flag_of
from bnlab.train.config import config_fields


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_has_its_flag_default_and_help() -> None:
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in config_fields():
        action = actions[f.name]
        assert flag_of(f) in action.option_strings, f.name
        assert action.help == f.metadata["help"] and len(action.help) > 5, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # dict fields collect KEY=VALUE pairs into a list; the config gets dict(list)
        assert (dict(action.default) if isinstance(default, dict) else action.default) \
            == default, f.name
    assert config_from_args(_train_parser().parse_args([])) == TrainConfig()


def test_a_new_field_is_a_new_flag_without_another_edit() -> None:
    """The parser is made from the fields: every flag the parser has for the config is a
    field, and parsing each flag lands in that field."""
    argv = ["--model", "deep_mlp", "--steps", "7", "--lr", "0.5", "--eval-train",
            "--model-arg", "width=3", "--norm-arg", "momentum=0.5", "--dist-timeout", "9",
            "--seed", "-4", "--train-subset", "100"]
    config = config_from_args(_train_parser().parse_args(argv))
    assert config == TrainConfig(model="deep_mlp", steps=7, lr=0.5, eval_train=True,
                                 model_kwargs={"width": 3}, norm_kwargs={"momentum": 0.5},
                                 dist_timeout_s=9.0, seed=-4, train_subset=100)
    epochs = config_from_args(_train_parser().parse_args(["--epochs", "2"]))
    assert epochs.epochs == 2.0 and epochs.steps is None  # --epochs clears the 500 steps


def test_json_round_trip() -> None:
    config = TrainConfig(model="deep_cnn", norm="ghost", epochs=1.5, steps=None, lr=1e-3,
                         model_kwargs={"depth": 2, "width": 4},
                         norm_kwargs={"virtual_batch_size": 8, "momentum": None},
                         threads=2, init_scale=2.0, sync_bn=True, seed=2**63)
    again = TrainConfig.from_json(config.to_json())
    assert again == config and again.to_json() == config.to_json()
    assert TrainConfig.from_dict({"lr": 1, "seed": 3}).lr == 1.0  # JSON ints for floats
    with pytest.raises(ConfigError, match=r"unknown config fields \['colour'\]"):
        TrainConfig.from_dict({"colour": "red"})


@pytest.mark.parametrize("change,field,match", [
    ({"seed": 2**64}, "seed", "seed must be a whole number in"),
    ({"seed": 1.5}, "seed", "seed must be a whole number"),
    ({"threads": 100_000}, "threads", r"threads must be a whole number in \[1, 1024\]"),
    ({"dist_timeout_s": 1e300}, "dist_timeout_s", "dist_timeout_s must be a number in"),
    ({"dist_timeout_s": 0.0}, "dist_timeout_s", "dist_timeout_s must be a number in"),
    ({"lr": math.inf}, "lr", "lr must be a positive finite number"),
    ({"batch_size": True}, "batch_size", "batch_size must be a positive whole number"),
    ({"eval_train": "yes"}, "eval_train", "eval_train must be true or false"),
    ({"model": 3}, "model", "model must be a name"),
    ({"model_kwargs": [1, 2]}, "model_kwargs", "model_kwargs must be a dict"),
    ({"model_kwargs": {"depth": -3}, "model": "deep_mlp"}, "model_kwargs",
     "model option depth must be a whole number in"),
    ({"model_kwargs": {"dropout": 1.0}}, "model_kwargs", r"dropout must be in \[0, 1\)"),
    ({"norm_kwargs": {"momentum": 2}}, "norm_kwargs",
     r"momentum must be a number in \[0, 1\]"),
    ({"norm_kwargs": {"momentum": -1}}, "norm_kwargs",
     r"momentum must be a number in \[0, 1\]"),
    ({"norm_kwargs": {"eps": 0}}, "norm_kwargs", "eps must be a positive finite number"),
    ({"norm_kwargs": {"affine": "no"}}, "norm_kwargs", "affine must be true or false"),
    ({"norm_kwargs": {"colour": 1}}, "norm_kwargs", "norm 'bn' does not take colour; its "
     "options: eps=1e-05, momentum=0.1"),
    ({"norm_kwargs": {"device": "meta"}}, "norm_kwargs", "does not take device"),
    ({"norm_kwargs": {"x": {"y": 1}}}, "norm_kwargs", "option x must be a number"),
    ({"norm": "ghost", "norm_kwargs": {"virtual_batch_size": 0}}, "norm_kwargs",
     "virtual_batch_size must be a positive whole number"),
    ({"batch_size": 1}, "batch_size", "batch_size 1 with norm 'bn': batch statistics need "
     "at least 2"),
    ({"norm": "renorm", "batch_size": 1}, "batch_size", "with norm 'renorm'"),
])
def test_bad_values_name_the_field(change: dict, field: str, match: str) -> None:
    config = dataclasses.replace(TrainConfig(dataset="digits"), **change)
    with pytest.raises(ConfigError, match=match) as info:
        validate_config(config)
    assert info.value.field == field


@pytest.mark.parametrize("change", [
    {"batch_size": 1, "norm": "gn"}, {"batch_size": 1, "norm": "none"},
    {"norm_kwargs": {"momentum": None}}, {"norm_kwargs": {"momentum": 0.0, "eps": 1e-3}},
    {"seed": -(2**63)}, {"seed": 2**64 - 1}, {"threads": 1024},
    {"model": "deep_cnn", "model_kwargs": {"depth": 20, "width": 64}},
    {"norm": "gn", "norm_kwargs": {"groups": 4}},
])
def test_legitimate_values_pass(change: dict) -> None:
    validate_config(dataclasses.replace(TrainConfig(dataset="digits"), **change))


def test_the_cli_words_errors_in_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from bnlab.cli import main

    assert main(["train", "--dataset", "digits", "--threads", "100000"]) == 2
    assert main(["train", "--dataset", "digits", "--norm-arg", "momentum=2"]) == 2
    assert main(["train", "--dataset", "digits", "--dist-timeout", "1e300"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("bnlab train: error: --threads must be a whole number in")
    assert lines[1].startswith("bnlab train: error: --norm-arg: norm option momentum")
    assert lines[2].startswith("bnlab train: error: --dist-timeout must be a number in")
    assert len(lines) == 3
