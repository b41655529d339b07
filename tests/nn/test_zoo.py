"""The toolkit's rewriting functions on the architecture patterns model zoos use.

Each pattern (written here, after the layers of torchvision and timm, no downloads) runs
through every rewriting function; the result must compute what the original computes (in
eval: fold, freeze, unfreeze; in training, with the identity settings that make the new
layer plain BN: replace_norm to bn / renorm(r_max=1, d_max=0) / ghost(whole batch) / sync,
and convert_sync_batchnorm without a process group), and exactly the layers it cannot prove
safe must be named in a warning and left as they were.

``python tests/nn/test_zoo.py`` prints the table pattern x function -> result.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bnlab.nn import (
    BatchRenorm2d,
    NormAct,
    RewriteWarning,
    convert_sync_batchnorm,
    fold_bn,
    freeze_bn,
    recalibrate_bn,
    replace_norm,
    unfreeze_bn,
)
from bnlab.nn.replace import is_batchnorm

# ------------------------------------------------------------------ layers of the zoo


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused layer: BN (its own F.batch_norm call), then drop, then act."""

    def __init__(self, num_features: int, act: type[nn.Module] = nn.ReLU, drop: float = 0.0):
        super().__init__(num_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or self.running_mean is None
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         batch_stats, factor, self.eps)
        return self.act(self.drop(x))


class BNReLU(nn.BatchNorm2d):
    """The smallest fused layer: a ReLU after super().forward."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class ABN(nn.BatchNorm2d):
    """InPlace-ABN's shape: the activation named by a string, applied functionally."""

    def __init__(self, num_features: int, activation: str = "leaky_relu",
                 activation_param: float = 0.01):
        super().__init__(num_features)
        self.activation, self.activation_param = activation, activation_param

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x), self.activation_param)


class BNAct1d(nn.BatchNorm1d):
    """A fused BN+act for (N, C) features after a Linear."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class RenormAct2d(BatchRenorm2d):
    """A fused layer on bnlab's Batch Renorm."""

    def forward(self, x: Tensor) -> Tensor:
        return F.hardswish(super().forward(x))


class ScaledBN(nn.BatchNorm2d):
    """A subclass no rule can prove: BN times two. Must be left alone, with a warning."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class Conv3DSimple(nn.Conv3d):
    """torchvision's r3d block conv: a Conv3d with its own __init__ only."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, padding: int = 1):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride,
                         padding=padding, bias=False)


class Conv2dSame(nn.Conv2d):
    """timm's TF-"SAME" conv: pad from the input size, then convolve (fx cannot trace it)."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                 self.dilation[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


# ------------------------------------------------------------------ the patterns


def _cbr(cin: int, cout: int, k: int = 3, **kw: Any) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout),
            nn.ReLU()]


class DenseLayer(nn.Module):
    """DenseNet: pre-activation BN (no conv before it), concatenation."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class AuxNet(nn.Module):
    """googlenet / inception_v3: an auxiliary head used only in training."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*_cbr(3, 6))
        self.aux = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.Flatten(1),
                                 nn.Linear(4 * 36, 3))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Any:
        y = self.body(x)
        out = self.head(y.mean((2, 3)))
        if self.training:
            return out, self.aux(y)
        return out


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(c, nn.SiLU)
        self.reduce, self.expand = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        s = torch.sigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return y * s


class MixConv(nn.Module):
    """mixnet: channel groups convolved with different kernels, concatenated, then BN."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, k, padding=k // 2) for k in (1, 3, 5)])
        self.bn = nn.BatchNorm2d(9)
        self.branch_bns = nn.ModuleList([nn.BatchNorm2d(3) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, 2, dim=1)
        mixed = self.bn(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1))
        each = torch.cat([b(self.convs[i](parts[i])) for i, b in enumerate(self.branch_bns)],
                         1)
        return mixed + each


class BasicBlock(nn.Module):
    """ResNet: conv-bn-relu-conv-bn + (conv1x1-bn) shortcut, add, relu."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.down(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.ReLU, 0.2),
                                  nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.post = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return self.post(y) if float(y.mean()) > -1e9 else y


@dataclass(frozen=True)
class Pattern:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    unproven: tuple[str, ...] = ()  # layers no rewrite may touch (each must be warned about)
    untraceable: bool = False
    not_synced: tuple[str, ...] = ()  # layers convert_sync_batchnorm leaves, with a warning


PATTERNS: dict[str, Pattern] = {
    "bnact (drop+act)": Pattern(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, nn.ReLU, 0.3),
        nn.Conv2d(4, 4, 3, groups=2), BatchNormAct2d(4, nn.SiLU, 0.1)), (4, 3, 8, 8)),
    "bnact identity": Pattern(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.Identity)), (4, 3, 6, 6)),
    "BNReLU (minimal)": Pattern(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BNReLU(4)),
                                (4, 3, 6, 6)),
    "ABN leaky_relu": Pattern(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), ABN(4)),
                              (4, 3, 6, 6)),
    "Linear + BN1d+act head": Pattern(lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(12, 6), BNAct1d(6), nn.Linear(6, 3)), (5, 3, 2, 2)),
    "bnlab renorm + act subclass": Pattern(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), RenormAct2d(4)), (4, 3, 6, 6), not_synced=("1",)),
    "unproven subclass": Pattern(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), ScaledBN(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        (4, 3, 6, 6), unproven=("1",)),
    "conv subclass (Conv3DSimple)": Pattern(lambda: nn.Sequential(
        Conv3DSimple(2, 4), nn.BatchNorm3d(4), nn.ReLU(), Conv3DSimple(4, 4, 2),
        nn.BatchNorm3d(4)), (3, 2, 4, 5, 5)),
    "pad-then-conv (Conv2dSame)": Pattern(lambda: nn.Sequential(
        Conv2dSame(3, 4, 3, stride=2), BatchNormAct2d(4, nn.SiLU),
        Conv2dSame(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4)), (4, 3, 7, 8)),
    "pre-activation (DenseNet)": Pattern(lambda: nn.Sequential(
        DenseLayer(3, 2), DenseLayer(5, 2), nn.BatchNorm2d(7)), (4, 3, 5, 5)),
    "training-only aux head": Pattern(AuxNet, (4, 3, 6, 6)),
    "squeeze-excitation": Pattern(lambda: SqueezeExcite(4), (4, 4, 5, 5)),
    "depthwise / grouped": Pattern(lambda: nn.Sequential(
        *_cbr(4, 4, groups=4), *_cbr(4, 6, groups=2), *_cbr(6, 6, 1)), (4, 4, 6, 6)),
    "mixed convs + concat": Pattern(MixConv, (4, 6, 6, 6)),
    "residual blocks": Pattern(lambda: nn.Sequential(
        BasicBlock(3, 4), BasicBlock(4, 4)), (4, 3, 8, 8)),
    "untraceable module": Pattern(Untraceable, (4, 3, 6, 6), untraceable=True),
}


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def build(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return _randomise(PATTERNS[name].build()).to(dtype)


def _outputs(model: nn.Module, x: Tensor, training: bool) -> list[Tensor]:
    model.train(training)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def _rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    assert len(got) == len(want)
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
               for g, w in zip(got, want, strict=True))


# Each function: (rewrite a deepcopy, mode the outputs are compared in).
FUNCTIONS: dict[str, tuple[Callable[[nn.Module, int], nn.Module], bool]] = {
    "fold_bn": (lambda m, n: fold_bn(m.eval()), False),
    "freeze_bn": (lambda m, n: freeze_bn(m), False),
    "unfreeze_bn": (lambda m, n: unfreeze_bn(freeze_bn(m)), False),
    "replace bn": (lambda m, n: replace_norm(m, "bn"), True),
    "replace renorm": (lambda m, n: replace_norm(m, "renorm", r_max=1.0, d_max=0.0), True),
    "replace ghost": (lambda m, n: replace_norm(m, "ghost", virtual_batch_size=n), True),
    "replace frozen": (lambda m, n: replace_norm(m, "frozen"), False),
    "replace sync": (lambda m, n: replace_norm(m, "sync"), True),
    "convert_sync": (lambda m, n: convert_sync_batchnorm(m), True),
}


@dataclass
class Outcome:
    error: float
    running_error: float  # after a training forward (0 in eval comparisons)
    warned: list[str]
    model: nn.Module


def run(pattern: str, function: str, dtype: torch.dtype) -> Outcome:
    original = build(pattern, dtype)
    rewrite, training = FUNCTIONS[function]
    x = torch.randn(PATTERNS[pattern].shape, generator=torch.Generator().manual_seed(2),
                    dtype=dtype) * 2 + 0.3
    work = copy.deepcopy(original)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = rewrite(work, x.shape[0])
    warned = [str(w.message) for w in caught if issubclass(w.category, RewriteWarning)]
    want = _outputs(original, x, training)
    got = _outputs(new, x, training)
    running = 0.0
    if training:  # the running statistics after one training step agree too
        stats = {n: b for n, b in original.named_buffers() if n.endswith("running_mean")}
        new_stats = [b for n, b in new.named_buffers() if n.endswith("running_mean")]
        running = _rel_err(new_stats, list(stats.values()))
    return Outcome(_rel_err(got, want), running, warned, new)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _expected_warnings(pattern: str, function: str) -> list[str]:
    spec = PATTERNS[pattern]
    # convert_sync_batchnorm's one warning lists "name (reason)"; the others "layer 'name'".
    sync = function in ("convert_sync", "replace sync")
    expected = [f"{name} (" if sync else f"'{name}'" for name in spec.unproven]
    if function == "convert_sync":
        expected += [f"{name} (" for name in spec.not_synced]
    if function == "fold_bn" and spec.untraceable:
        expected.append("could not trace")
    return expected


CASES = [(p, f, d) for p in PATTERNS for f in FUNCTIONS
         for d in ((torch.float64, torch.float32) if f in ("fold_bn", "freeze_bn")
                   else (torch.float64,))]


@pytest.mark.parametrize(("pattern", "function", "dtype"), CASES,
                         ids=[f"{p}-{f}-{str(d)[6:]}" for p, f, d in CASES])
def test_zoo_rewrite_preserves_the_output_or_warns_and_leaves_the_layer(
        pattern, function, dtype, single_threaded):
    out = run(pattern, function, dtype)
    assert out.error <= TOL[dtype], f"{pattern} / {function}: relative error {out.error:.2e}"
    assert out.running_error <= TOL[dtype]
    expected = _expected_warnings(pattern, function)
    for text in expected:
        assert any(text in w for w in out.warned), (text, out.warned)
    if not expected:
        assert out.warned == []
    for name in PATTERNS[pattern].unproven:  # left exactly as it was
        assert type(out.model.get_submodule(name)) is type(build(pattern, dtype)
                                                            .get_submodule(name))


def _fold_report(pattern: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewriteWarning)
        return fold_bn(build(pattern, torch.float64), report=True)


def test_minimal_bn_relu_folds_freezes_and_replaces_to_the_original_output(single_threaded):
    class Minimal(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    net = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), Minimal(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x).detach()
    assert float(ref.min()) == 0.0
    folded, report = fold_bn(net, report=True)
    assert [(e.layer, e.action) for e in report.entries] == [("1", "folded")]
    assert not any(is_batchnorm(m) for m in folded.modules())
    for out in (folded(x), freeze_bn(copy.deepcopy(net))(x),
                replace_norm(copy.deepcopy(net), "renorm").eval()(x)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert float(out.detach().min()) >= 0.0  # the ReLU is kept


def test_fold_report_names_every_layer_and_the_reason():
    _, rep = _fold_report("pre-activation (DenseNet)")
    actions = {e.layer: (e.action, e.detail) for e in rep.entries}
    assert actions["0.norm1"][0] == "affine" and "no Conv/Linear" in actions["0.norm1"][1]
    assert actions["0.norm2"] == ("folded", "into 0.conv1 (Conv2d)")
    _, rep = _fold_report("training-only aux head")
    assert rep.layers("removed") == ["aux.1"]
    _, rep = _fold_report("mixed convs + concat")
    detail = dict((e.layer, e.detail) for e in rep.entries)
    # Each branch conv is called twice: its BN use is folded into a clone of its own.
    assert rep.layers("folded") == ["branch_bns.0", "branch_bns.1", "branch_bns.2"]
    assert detail["branch_bns.0"] == "into convs_0_folded (Conv2d)"
    assert rep.layers("affine") == ["bn"] and "call_function cat" in detail["bn"]
    folded, rep = _fold_report("pad-then-conv (Conv2dSame)")
    assert rep.count("folded") == 2 and isinstance(folded.get_submodule("1.act"), nn.SiLU)
    _, rep = _fold_report("untraceable module")
    assert rep.notes and "could not trace" in rep.notes[0]
    assert rep.layers("folded") == ["body.1", "body.3"] and rep.layers("affine") == ["post"]
    _, rep = _fold_report("unproven subclass")
    assert rep.layers("left") == ["1"] and "ScaledBN" in rep.entries[0].detail
    assert "folded" in str(rep) and "ScaledBN" in str(rep)


def test_fold_leaves_a_conv_subclass_whose_forward_is_not_affine_in_its_weights():
    class ConvReLU(nn.Conv2d):
        def forward(self, x):
            return F.relu(super().forward(x))

    class StdConv(nn.Conv2d):  # weight standardisation: invariant to scaling the weight
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
                self.weight.std((1, 2, 3), keepdim=True) + 1e-6)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    for conv in (ConvReLU(3, 4, 3), StdConv(3, 4, 3)):
        net = _randomise(nn.Sequential(conv, nn.BatchNorm2d(4))).double().eval()
        folded, rep = fold_bn(net, report=True)
        assert rep.entries[0].action == "affine"
        assert "not proven affine" in rep.entries[0].detail
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-12)


def test_forward_hooks_are_never_dropped_by_a_rewrite():
    calls = []
    net = build("residual blocks", torch.float64).eval()
    net[0].bn1.register_forward_hook(lambda m, i, o: calls.append("bn1"))
    net[1].register_forward_pre_hook(lambda m, i: calls.append("block"))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = net(x)
    with pytest.warns(RewriteWarning) as caught:
        folded, rep = fold_bn(net, report=True)
    text = " ".join(str(w.message) for w in caught)
    assert "forward hooks on 1 would be lost" in text and "'0.bn1'" in text
    assert ("0.bn1", "left") in [(e.layer, e.action) for e in rep.entries]
    calls.clear()
    torch.testing.assert_close(folded(x), ref, rtol=1e-10, atol=1e-12)
    assert calls == ["bn1", "block"]
    with pytest.warns(RewriteWarning, match="'0.bn1' unchanged: it has forward hooks"):
        freeze_bn(net)
    assert type(net[0].bn1) is nn.BatchNorm2d


def test_rewrites_report_what_they_converted_and_left():
    net = build("unproven subclass", torch.float64)
    with pytest.warns(RewriteWarning, match=r"left layer '1' unchanged: ScaledBN"):
        _, rep = replace_norm(net, "renorm", report=True)
    assert [(e.layer, e.action) for e in rep.entries] == [("1", "left"), ("3", "replaced")]
    net = build("bnact (drop+act)", torch.float64)
    _, rep = convert_sync_batchnorm(net, report=True)
    assert rep.layers("converted") == ["1", "3"]
    assert rep.entries[0].detail == "BatchNormAct2d -> SyncBatchNorm + drop, act kept"
    assert isinstance(net[1], NormAct) and net[1].act is not None


@pytest.mark.parametrize("layerwise", [True, False])
def test_recalibrate_skips_the_training_only_branch_and_reports_it(layerwise, single_threaded):
    net = build("training-only aux head", torch.float64)
    aux_before = (net.aux[1].running_mean.clone(), net.aux[1].running_var.clone())
    data = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    with pytest.warns(RewriteWarning, match=r"left 1 unchanged: aux\.1 \(never reached"):
        _, rep = recalibrate_bn(net, data, progress=False, report=True, layerwise=layerwise)
    assert rep.layers("recalibrated") == ["body.1"] and rep.layers("skipped") == ["aux.1"]
    assert torch.equal(net.aux[1].running_mean, aux_before[0])
    assert torch.equal(net.aux[1].running_var, aux_before[1])
    body_in = torch.cat([net.body[0](x) for x in data]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(net.body[1].running_mean, body_in.mean(1), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(net.body[1].running_var, body_in.var(1), rtol=1e-12,
                               atol=1e-12)
    class Unreached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)  # bn: registered, unused

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="reached none of its 1 batch-norm"):
        recalibrate_bn(Unreached(), [torch.randn(4, 3)], progress=False)


def test_recalibrate_skips_a_subclass_it_cannot_prove(single_threaded):
    net = build("unproven subclass", torch.float64)
    before = net[1].running_mean.clone()
    data = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    with pytest.warns(RewriteWarning, match=r"left 1 unchanged: 1 \(ScaledBN"):
        _, rep = recalibrate_bn(net, data, progress=False, report=True)
    assert rep.layers("recalibrated") == ["3"] and rep.layers("skipped") == ["1"]
    assert torch.equal(net[1].running_mean, before)
    fused = build("bnact (drop+act)", torch.float64)  # BN + tail: its input is what it normalises
    _, rep = recalibrate_bn(fused, data, progress=False, report=True)
    assert rep.layers("recalibrated") == ["1", "3"]
    with torch.no_grad():
        z = torch.cat([fused[0](x) for x in data])
    torch.testing.assert_close(fused[1].running_mean, z.mean((0, 2, 3)), rtol=1e-12,
                               atol=1e-12)


def table() -> str:
    """pattern x function -> 'ok' (or 'WRONG') and the max relative error against the
    original (float64; fold and freeze: float64 / float32), 'warned' when a RewriteWarning
    was issued; the fold column adds what the report says happened to the BN layers."""
    rows = [["pattern", *FUNCTIONS]]
    for pattern in PATTERNS:
        row = [pattern]
        for function in FUNCTIONS:
            cells = []
            dtypes = (torch.float64, torch.float32) if function in ("fold_bn", "freeze_bn") \
                else (torch.float64,)
            for dtype in dtypes:
                out = run(pattern, function, dtype)
                ok = out.error <= TOL[dtype] and out.running_error <= TOL[dtype]
                cells.append(f"{'ok' if ok else 'WRONG'} {max(out.error, out.running_error):.0e}")
            note = " warned" if out.warned else ""
            if function == "fold_bn":
                _, rep = _fold_report(pattern)
                note += " (" + ", ".join(f"{rep.count(a)} {a}" for a in
                                          dict.fromkeys(e.action for e in rep.entries)) + ")"
            row.append(" / ".join(cells) + note)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     + " |" for r in rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(table())
    sys.exit(0)
