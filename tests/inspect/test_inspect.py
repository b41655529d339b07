"""bnlab inspect: numbers equal a hand-written hook loop, the model is restored exactly, and
on the paper MLP it shows the lecture's picture (BN: less saturation, update:data ≈ 1e-3)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.cli import main
from bnlab.inspect import inspect, write_report
from bnlab.models import build_model, scale_init


@pytest.fixture(autouse=True)
def _one_thread(single_threaded: None) -> Iterator[None]:
    yield


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.Sigmoid(),
        nn.Linear(16, 5),
    )


def _batches(n: int = 4, size: int = 32, features: int = 12) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, features, generator=g) * 3,
             torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def _by_hand(model: nn.Module, batches: list, steps: int, lr: float) -> dict:
    """The four panels the way the lecture's notebook computes them, with plain hooks."""
    acts: list[tuple[type, torch.Tensor]] = []

    def keep(m: nn.Module, inputs: tuple, o: torch.Tensor) -> None:
        o.retain_grad()
        acts.append((type(m), o))

    handles = [m.register_forward_hook(keep) for m in model.modules()
               if isinstance(m, (nn.Tanh, nn.ReLU, nn.Sigmoid))]
    weights = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    updates: list[list[float]] = [[] for _ in weights]
    out: dict = {}
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            out["act"] = []
            for kind, t in acts:
                t64 = t.detach().double()
                row = [t64.mean().item(), t64.std().item()]
                if kind is nn.Tanh:
                    row.append((t64.abs() > 0.97).double().mean().item())
                elif kind is nn.Sigmoid:
                    row.append(((2 * t64 - 1).abs() > 0.97).double().mean().item())
                else:
                    row.append((t64 == 0).double().mean().item())
                out["act"].append(row)
            out["grad"] = [t.grad.double().std().item() for _, t in acts]
            out["ratio"] = [(p.grad.double().std() / p.detach().double().std()).item()
                            for p in weights]
            for h in handles:
                h.remove()
        old = [p.detach().clone() for p in weights]
        opt.step()
        for k, (p, o) in enumerate(zip(weights, old, strict=True)):
            updates[k].append(math.log10(((p.detach() - o).double().std() / o.double().std())
                                         .item()))
    out["updates"] = updates
    return out


def test_numbers_equal_a_hand_written_hook_loop() -> None:
    model, batches = _net(), _batches()
    reference = _by_hand(copy.deepcopy(model), batches, steps=6, lr=0.05)
    r = inspect(model, batches, steps=6, lr=0.05)
    assert [a.kind for a in r.activations] == ["Tanh", "ReLU", "Sigmoid"]
    for a, (mean, std, frac) in zip(r.activations, reference["act"], strict=True):
        assert a.mean == pytest.approx(mean, abs=1e-6)
        assert a.std == pytest.approx(std, abs=1e-6)
        got = a.zero if a.kind == "ReLU" else a.saturated
        assert got == pytest.approx(frac, abs=1e-6)
    for g, std in zip(r.gradients, reference["grad"], strict=True):
        assert g.std == pytest.approx(std, rel=1e-6)
    for w, ratio in zip(r.weights, reference["ratio"], strict=True):
        assert w.grad_data == pytest.approx(ratio, rel=1e-6)
    for series, ref in zip(r.updates.values(), reference["updates"], strict=True):
        assert series == pytest.approx(ref, abs=1e-6)
    # Each histogram is a density: it integrates to 1.
    h = r.activations[0].hist
    assert sum(h.density) * (h.hi - h.lo) / len(h.density) == pytest.approx(1.0)


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone()
                  for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all((a["grads"][k] is None and b["grads"][k] is None)
               or torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
    assert a["requires_grad"] == b["requires_grad"]
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


def _odd_state(model: nn.Module) -> nn.Module:
    """Eval mode with one submodule in training, a frozen bias, leftover gradients."""
    model.eval()
    model[3].train()
    model[0].bias.requires_grad_(False)
    model[2].weight.grad = torch.full_like(model[2].weight, 0.5)
    return model


def test_model_state_is_restored_exactly() -> None:
    model = _odd_state(_net())
    before = _snapshot(model)
    r = inspect(model, _batches(), steps=3, lr=0.1)
    assert r.updates and max(r.updates["2.weight"]) > -6  # it did train, in place
    _assert_same(before, _snapshot(model))


def test_model_state_is_restored_when_the_loss_raises() -> None:
    model = _odd_state(_net())
    before = _snapshot(model)
    calls = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        inspect(model, _batches(), steps=5, loss_fn=loss_fn)
    _assert_same(before, _snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_arguments_raise_valueerror() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        inspect(_net(), _batches(), steps=0)
    with pytest.raises(ValueError, match="batches is empty"):
        inspect(_net(), [], steps=1)


def test_a_diverged_layer_does_not_break_the_histograms() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    r = inspect(model, _batches(), steps=1)
    assert math.isnan(r.activations[0].mean)
    assert len(r.activations[0].hist.density) == 60


def _digits_batches(steps: int) -> tuple[list, tuple[int, int, int]]:
    from bnlab.data import load_dataset

    splits = load_dataset("digits")
    x, y = splits.train.tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return [(x[idx[i * 64:(i + 1) * 64]], y[idx[i * 64:(i + 1) * 64]])
            for i in range(steps)], splits.in_shape


def test_paper_mlp_shows_the_lecture_picture_on_digits() -> None:
    # A too-large init (x5): without BN the sigmoids saturate; with BN they do not, and at
    # lr 0.1 the updates are about 1e-3 of the weights.
    batches, in_shape = _digits_batches(20)
    results = {}
    for norm in ("bn", "none"):
        torch.manual_seed(0)
        model = build_model("paper_mlp", norm=norm, in_shape=in_shape)
        scale_init(model, 5.0)
        results[norm] = inspect(model, batches, steps=20, lr=0.1, label=norm)
    bn, none = results["bn"], results["none"]
    assert none.mean_saturation() > 0.03 > bn.mean_saturation() + 0.02
    assert -3.5 < bn.median_update_ratio() < -2.5
    assert bn.losses[-1] < none.losses[-1]


def test_write_report_is_self_contained(tmp_path: Path) -> None:
    r1 = inspect(_net(), _batches(), steps=2, label="a")
    r2 = inspect(_net(), _batches(), steps=2, label="b")
    page = write_report([r1, r2], tmp_path / "out")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 8
    assert "src=\"http" not in text and "<link" not in text
    for label in ("a", "b"):
        for panel in ("activations", "gradients", "weights", "updates"):
            assert (tmp_path / "out" / f"{label}-{panel}.png").read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [s["label"] for s in stats] == ["a", "b"]
    with pytest.raises(ValueError, match="labels must differ"):
        write_report([r1, r1], tmp_path / "dup")


def test_cli_fresh_models_and_a_checkpoint(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fresh"
    assert main(["inspect", "--model", "paper_mlp", "--norm", "none", "--steps", "2",
                 "--out", str(out)]) == 0
    assert "paper_mlp-none" in capsys.readouterr().out
    assert (out / "index.html").is_file() and (out / "paper_mlp-none-updates.png").is_file()

    from bnlab.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(model="seed_cnn", dataset="digits", steps=2, eval_every=2, threads=1),
          out_dir=run)
    assert main(["inspect", str(run / "model.safetensors"), "--compare-norm", "none",
                 "--steps", "2", "--out", str(tmp_path / "ck")]) == 0
    printed = capsys.readouterr().out
    assert "seed_cnn-bn" in printed and "seed_cnn-none" in printed
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err
