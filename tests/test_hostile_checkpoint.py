"""Crafted checkpoints and config values: refused before anything is built, in bounded memory.

Every crafted file is a real safetensors file whose header lies (metadata describing a huge
or broken model, tensors of the wrong dtype). All cases run through ``bnlab eval`` (the
CLI's ``main``) in one fresh subprocess that records, after each case, the exit code, what
went to stderr and its peak resident memory. The peak is the kernel's ``VmHWM`` of the
subprocess's own image: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` would include the
resident size of the (large) pytest process it was forked from, which Linux carries
across ``execve``; ``getrusage`` is the fallback where ``/proc`` is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bnlab.errors import BnlabError
from bnlab.train import TrainConfig, build, load_checkpoint, save_checkpoint

GB = 2**30
BASE = TrainConfig(model="deep_mlp", norm="bn", dataset="digits",
                   model_kwargs={"depth": 2, "width": 8})


def _legit(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = tmp_path / "legit.safetensors"
    save_checkpoint(path, build(BASE), BASE)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())  # noqa: SIM118


def _crafted(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the one error line must contain)."""
    state, meta = _legit(tmp_path)
    config = json.loads(meta["config"])

    def with_config(**change: object) -> dict[str, str]:
        return {**meta, "config": json.dumps({**config, **change})}

    cases: dict[str, tuple[dict[str, torch.Tensor], dict[str, str], str]] = {
        "depth-1e7": (state, with_config(model_kwargs={"depth": 10**7, "width": 8}),
                      "depth must be a whole number in [1, 1000], got 10000000"),
        "width-12000": (state, with_config(model_kwargs={"depth": 2, "width": 12000}),
                        "blocks.0.layer.weight is F32 [8, 64], expected F32 [12000, 64]"),
        "width-1e9": (state, with_config(model_kwargs={"depth": 2, "width": 1e9}),
                      "width must be a whole number"),
        "width-2**20-depth-1000": (
            state, with_config(model_kwargs={"depth": 1000, "width": 2**20}),
            "would need about"),
        "in_shape-huge": (state, {**meta, "in_shape": json.dumps([1, 10**9, 10**9])},
                          "in_shape [1, 1000000000, 1000000000] is not digits's [1, 8, 8]"),
        "num_classes-negative": (state, {**meta, "num_classes": "-3"},
                                 "num_classes -3 is not digits's 10"),
        "model_kwargs-not-a-dict": (state, with_config(model_kwargs=[1, 2]),
                                    "model_kwargs must be a dict"),
        "norm_kwargs-junk": (state, with_config(norm_kwargs={"zz": [1]}),
                             "norm_kwargs: option zz must be a number"),
        "norm_kwargs-unknown": (state, with_config(norm_kwargs={"zz": 1}),
                                "norm 'bn' does not take zz"),
        "momentum-2": (state, with_config(norm_kwargs={"momentum": 2}),
                       "momentum must be a number in [0, 1]"),
        "eps-0": (state, with_config(norm_kwargs={"eps": 0}), "eps must be a positive"),
        "seed-65-bits": (state, with_config(seed=2**65), "seed must be a whole number in"),
        "unknown-field": (state, with_config(colour="red"), "unknown config fields"),
        "config-not-json": (state, {**meta, "config": "{not json"}, "not valid JSON"),
        "int32-weight": ({**state, "blocks.0.layer.weight":
                          state["blocks.0.layer.weight"].to(torch.int32)}, meta,
                         "blocks.0.layer.weight is I32 [8, 64], expected F32 [8, 64]"),
        "extra-tensor": ({**state, "junk": torch.zeros(3)}, meta, "unexpected ['junk']"),
    }
    out = {}
    for name, (tensors, metadata, expect) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        out[name] = (path, expect)
    return out


_PEAK = textwrap.dedent("""
    import resource

    def peak_kb():
        try:
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
""")

_RUNNER = _PEAK + textwrap.dedent("""
    import contextlib, io, json, sys
    from bnlab.cli import main

    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(["eval", path, "--no-download"])
            except BaseException as exc:  # what a user would see as a traceback
                rc = f"raised {type(exc).__name__}: {exc}"
        results[name] = {"rc": rc, "err": err.getvalue(),
                         "maxrss_kb": peak_kb()}
    print(json.dumps(results))
""")


def test_crafted_checkpoints_are_refused_in_one_line_with_bounded_memory(
    tmp_path: Path,
) -> None:
    cases = _crafted(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _RUNNER,
                           json.dumps({k: str(p) for k, (p, _) in cases.items()})],
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(proc.stdout)
    for name, (path, expect) in cases.items():
        r = results[name]
        lines = r["err"].splitlines()
        assert r["rc"] == 2, (name, r)
        assert len(lines) == 1 and lines[0].startswith("bnlab eval: error: "), (name, r)
        assert expect in lines[0] and str(path) in lines[0], (name, lines[0])
        assert "Traceback" not in r["err"]
        assert r["maxrss_kb"] * 1024 < 1 * GB, (name, r["maxrss_kb"])


def test_legitimate_checkpoint_still_loads(tmp_path: Path) -> None:
    state, _ = _legit(tmp_path)
    model, config = load_checkpoint(tmp_path / "legit.safetensors")
    assert config == BASE
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_library_refuses_the_same_as_the_cli(tmp_path: Path) -> None:
    cases = _crafted(tmp_path)
    for name in ("depth-1e7", "int32-weight", "in_shape-huge"):
        path, expect = cases[name]
        with pytest.raises(BnlabError) as info:
            load_checkpoint(path)
        assert expect in str(info.value), name


_TRAIN_RUNNER = _PEAK + textwrap.dedent("""
    import contextlib, io, json, sys
    from bnlab.cli import main

    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["train", "--dataset", "digits", *argv])
        results.append({"rc": rc, "err": err.getvalue(),
                        "maxrss_kb": peak_kb()})
    print(json.dumps(results))
""")

TRAIN_CASES = [
    (["--model", "deep_mlp", "--model-arg", "width=1000000000"],
     "--model-arg: model option width must be a whole number in [1, 1048576]"),
    (["--model", "deep_mlp", "--model-arg", "depth=1000", "--model-arg", "width=1048576"],
     "--model-arg: model 'deep_mlp' (depth=1000, width=1048576) would need about"),
    (["--model", "deep_mlp", "--model-arg", "depth=10000000"],
     "--model-arg: model option depth must be a whole number in [1, 1000]"),
    (["--batch-size", "1"], "--batch-size 1 with norm 'bn': batch statistics need"),
    (["--seed", str(2**64)], "--seed must be a whole number in"),
]


def test_train_refuses_bad_values_before_loading_anything(tmp_path: Path) -> None:
    """Each refused in one line, exit 2, nothing written, in bounded memory (the model that
    would not fit is only estimated, on the meta device)."""
    out = tmp_path / "out"
    argvs = [[*argv, "--out", str(out)] for argv, _ in TRAIN_CASES]
    proc = subprocess.run([sys.executable, "-c", _TRAIN_RUNNER, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=120, check=True)
    for (argv, expect), r in zip(TRAIN_CASES, json.loads(proc.stdout), strict=True):
        lines = r["err"].splitlines()
        assert r["rc"] == 2, (argv, r)
        assert len(lines) == 1 and lines[0].startswith("bnlab train: error: "), (argv, r)
        assert expect in lines[0], (argv, lines[0])
        assert r["maxrss_kb"] * 1024 < 1 * GB, (argv, r["maxrss_kb"])
    assert not out.exists()
