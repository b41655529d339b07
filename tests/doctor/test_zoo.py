"""The bug zoo: faults planted into seed_cnn, deep_mlp and a ResNet-style net, each found
with the right layer; the clean models give nothing above "info"; examine never changes
the model. ``python tests/doctor/test_zoo.py`` prints the table (fault x model -> found,
layer, evidence)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlab.data import load_dataset
from bnlab.doctor import examine
from bnlab.models import build_model
from bnlab.nn import recalibrate_bn

BATCH = 32
NUM_BATCHES = 4


class BasicBlock(nn.Module):
    """torchvision-style residual block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 32, 2)  # 2x2 feature maps on 8x8 digits
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


# (builder, the BN layer faults go into, the conv/linear that feeds it, layers that a batch
# of 2 leaves with fewer than 16 values per channel)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, str, set[str]]] = {
    "seed_cnn": (lambda: build_model("seed_cnn", in_shape=(1, 8, 8)), "conv2.norm",
                 "conv2.layer", {"fc1.norm"}),
    "deep_mlp": (lambda: build_model("deep_mlp", in_shape=(1, 8, 8), depth=3, width=32),
                 "blocks.1.norm", "blocks.1.layer",
                 {"blocks.0.norm", "blocks.1.norm", "blocks.2.norm"}),
    "resnet": (ResNet, "layer1.bn2", "layer1.conv2",
               {"layer3.bn1", "layer3.bn2", "layer3.shortcut.1"}),
}


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits")
    return d.train.tensors[0], d.train.tensors[1]


def _batches(size: int = BATCH, count: int = NUM_BATCHES) -> list[tuple[torch.Tensor, ...]]:
    x, y = _data()
    return [(x[i:i + size], y[i:i + size]) for i in range(0, size * count, size)]


@functools.cache
def _clean(name: str) -> nn.Module:
    """Briefly trained on digits, statistics recalibrated on the zoo's batches, eval mode."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        i = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    recalibrate_bn(model, [b[0] for b in _batches()], progress=False)
    return model.eval()


def clean_model(name: str) -> nn.Module:
    return copy.deepcopy(_clean(name))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class SplitCall(nn.Module):
    """Calls the same BN on each half of the batch: one module, two calls per forward."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x):
        n = x.shape[0]
        return torch.cat([self.bn(x[: n // 2]), self.bn(x[n // 2:])])


def _stubborn(bn: nn.Module) -> nn.Module:
    """The BN's class with a train() override that keeps it training (a freeze gone wrong)."""
    cls = type(f"Stubborn{type(bn).__name__}", (type(bn),),
               {"train": lambda self, mode=True: nn.Module.train(self, True)})
    new = cls(bn.num_features)
    new.load_state_dict(bn.state_dict())
    return new


def _untracked(bn: Any) -> nn.Module:
    new = type(bn)(bn.num_features, track_running_stats=False)
    with torch.no_grad():
        new.weight.copy_(bn.weight)
        new.bias.copy_(bn.bias)
    return new


# Each plant: (model, target BN, producer) -> (model, batches, examine kwargs, code, layers)
Plant = Callable[[nn.Module, str, str, set[str]], tuple[nn.Module, Any, dict[str, Any], str,
                                                         set[str]]]


def _momentum(value: float, code: str) -> Plant:
    def plant(m, target, producer, tiny):
        m.get_submodule(target).momentum = value
        return m, _batches(), {}, code, {target}
    return plant


def _eps(m, target, producer, tiny):
    m.get_submodule(target).eps = 1e-3
    return m, _batches(), {}, "eps_keras", {target}


def _fake_freeze(m, target, producer, tiny):
    bn = m.get_submodule(target)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    m.train()
    return m, _batches(), {}, "fake_freeze", {target}


def _dropout(m, target, producer, tiny):
    _set(m, producer, nn.Sequential(nn.Dropout(0.5), m.get_submodule(producer)))
    return m, _batches(), {}, "dropout_feeds_bn", {target}


def _reused(m, target, producer, tiny):
    _set(m, target, SplitCall(m.get_submodule(target)))
    return m, _batches(), {}, "bn_reused", {target + ".bn"}


def _untrack(m, target, producer, tiny):
    _set(m, target, _untracked(m.get_submodule(target)))
    return m, _batches(), {}, "untracked_stats", {target}


def _nan(m, target, producer, tiny):
    with torch.no_grad():
        m.get_submodule(target).running_var[0] = float("nan")
    return m, _batches(), {}, "nonfinite_stats", {target}


def _fp16(m, target, producer, tiny):
    with torch.no_grad():
        m.get_submodule(target).running_var[1] = 1e6
    return m, _batches(), {}, "fp16_overflow", {target}


def _stale(m, target, producer, tiny):
    with torch.no_grad():
        m.get_submodule(producer).weight.mul_(3.0)
    return m, _batches(), {}, "stale_stats", {target}


def _stubborn_plant(m, target, producer, tiny):
    _set(m, target, _stubborn(m.get_submodule(target)))
    m.eval()
    return m, _batches(), {}, "bn_train_in_eval", {target}


def _stubborn_stats(m, target, producer, tiny):
    _set(m, target, _stubborn(m.get_submodule(target)))
    m.eval()
    return m, _batches(), {}, "stats_change_in_eval", {target}


def _tiny(m, target, producer, tiny):
    return m, _batches(size=2, count=4), {}, "tiny_batch", set(tiny)


def _eval_leak(m, target, producer, tiny):
    _set(m, target, _untracked(m.get_submodule(target)))
    return m, _batches(), {}, "eval_batch_dependence", {target}


FAULTS: dict[str, Plant] = {
    "momentum 0.99 (Keras decay)": _momentum(0.99, "momentum_keras"),
    "momentum 0": _momentum(0.0, "momentum_zero"),
    "eps 1e-3 (Keras default)": _eps,
    "requires_grad=False, train mode": _fake_freeze,
    "dropout before the conv/linear": _dropout,
    "BN called twice per forward": _reused,
    "track_running_stats=False": _untrack,
    "NaN in running_var": _nan,
    "running_var 1e6 (fp16)": _fp16,
    "weights x3, stats stale": _stale,
    "train() override keeps BN training": _stubborn_plant,
    "stats move during eval": _stubborn_stats,
    "batch of 2 (tiny)": _tiny,
    "eval output depends on the batch": _eval_leak,
}


def _state(model: nn.Module) -> list[Any]:
    """Everything examine must leave alone, compared bit for bit."""
    tensors = [(k, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()]
    return [tensors, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], torch.get_rng_state()]


def assert_same_state(a: list[Any], b: list[Any]) -> None:
    for (ka, ta), (kb, tb) in zip(a[0], b[0], strict=True):
        assert ka == kb
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, ka
        assert torch.equal(ta.view(torch.uint8) if ta.dim() else ta.reshape(1).view(
            torch.uint8), tb.view(torch.uint8) if tb.dim() else tb.reshape(1).view(
            torch.uint8)), ka
    assert a[1:3] == b[1:3]
    assert torch.equal(a[3], b[3])


def run_case(fault: str, model_name: str) -> tuple[Any, str, set[str]]:
    _, target, producer, tiny = MODELS[model_name]
    model, batches, kwargs, code, layers = FAULTS[fault](
        clean_model(model_name), target, producer, tiny)
    before = _state(model)
    report = examine(model, batches, **kwargs)
    assert_same_state(before, _state(model))
    return report, code, layers


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_found_with_its_layer(fault, model_name, single_threaded):
    report, code, layers = run_case(fault, model_name)
    found = report.find(code)
    assert found, f"{code} not found; findings: {[f.code for f in report.findings]}"
    named = set().union(*(set(f.layers) for f in found))
    assert named == layers, (code, named, layers)
    assert all(f.evidence for f in found)
    # No false alarm at "error" beyond what the fault explains.
    errors = {f.code for f in report.at_least("error")}
    assert errors <= {code, *EXPLAINED_ERRORS.get(code, ())}, errors


# Errors a fault legitimately brings along (a BN stuck in training mode also updates its
# statistics during eval, and the other way round).
EXPLAINED_ERRORS = {
    "bn_train_in_eval": ("stats_change_in_eval",),
    "stats_change_in_eval": ("bn_train_in_eval",),
}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_clean_model_has_nothing_above_info(model_name, single_threaded):
    model = clean_model(model_name)
    before = _state(model)
    report = examine(model, _batches())
    assert_same_state(before, _state(model))
    assert report.at_least("warning") == [], [(f.code, f.layers, f.evidence)
                                               for f in report.at_least("warning")]
    bias = report.find("bias_before_bn")
    if model_name == "resnet":  # torchvision's convention: no bias before BN
        assert bias == []
    else:
        assert bias and bias[0].severity == "info"


def zoo_table() -> str:
    rows = [f"{'fault':<36} {'model':<9} {'found':<5} {'layer':<22} evidence"]
    for fault in FAULTS:
        for model_name in MODELS:
            report, code, layers = run_case(fault, model_name)
            found = report.find(code)
            named = set().union(*(set(f.layers) for f in found)) if found else set()
            ok = "yes" if found and named == layers else "NO"
            evidence = found[0].evidence if found else "-"
            rows.append(f"{fault:<36} {model_name:<9} {ok:<5} "
                        f"{', '.join(sorted(named)) or '-':<22} {code}: {evidence}")
    for model_name in MODELS:
        report = examine(clean_model(model_name), _batches())
        worst = report.at_least("warning")
        rows.append(f"{'(clean)':<36} {model_name:<9} {'-':<5} {'-':<22} "
                    f"findings above info: {len(worst)}")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(zoo_table())
