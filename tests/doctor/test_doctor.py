"""examine/fix beyond the zoo: fixes and their exactness, state restored when a hook raises,
timm/torchvision-style patterns, untraceable models, the report's outputs."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlab.doctor import examine, fix
from bnlab.errors import BnlabError
from bnlab.nn import BatchRenorm1d, FrozenBatchNorm2d

_spec = importlib.util.spec_from_file_location("zoo", Path(__file__).with_name("test_zoo.py"))
assert _spec is not None and _spec.loader is not None
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def _equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k].nan_to_num(), sb[k].nan_to_num()) for k in sa)


# --------------------------------------------------------------------------- state


class Boom(Exception):
    pass


@pytest.mark.parametrize("raise_at", [1, 3, 6, 12])
def test_state_restored_bit_for_bit_when_a_hook_raises(raise_at, single_threaded):
    model = zoo.clean_model("seed_cnn")
    with torch.no_grad():
        model.conv2.norm.running_var[0] = float("nan")  # NaN must survive the restore too
    model.fc1.norm.weight.requires_grad_(False)
    model.train()
    model.conv1.eval()
    calls = {"n": 0}

    def hook(mod, args, out):
        calls["n"] += 1
        if calls["n"] == raise_at:
            raise Boom

    handle = model.conv2.norm.register_forward_hook(hook)
    before = zoo._state(model)
    try:
        with pytest.raises((Boom, BnlabError)):
            examine(model, zoo._batches())
    finally:
        handle.remove()
    zoo.assert_same_state(before, zoo._state(model))


# --------------------------------------------------------------------------- fix


def test_fix_never_modifies_the_original_and_clears_the_findings(single_threaded):
    model = zoo.clean_model("deep_mlp")
    model.blocks[0].norm.momentum = 0.99
    with torch.no_grad():
        model.blocks[1].layer.weight.mul_(3.0)  # stale statistics in blocks.1.norm
    original = copy.deepcopy(model)
    batches = zoo._batches()
    report = examine(model, batches)
    assert {"momentum_keras", "stale_stats"} <= report.codes()
    fixed = fix(model, report, batches=batches)
    assert _equal_states(model, original) and model.blocks[0].norm.momentum == 0.99
    assert fixed.blocks[0].norm.momentum == pytest.approx(0.01)
    after = examine(fixed, batches)
    assert after.at_least("warning") == [], [(f.code, f.evidence) for f in after.at_least(
        "warning")]
    stale = report.find("stale_stats")[0]
    # The measured effect is what recalibrating gives on the same data.
    assert stale.effect is not None
    assert after.metrics["accuracy_before_recalibration"] == pytest.approx(
        stale.effect["accuracy"][1], abs=1e-12)
    assert any("momentum 0.99 -> 0.01" in c for c in fixed.doctor_changes)


def test_bias_fold_is_exact_in_float64(single_threaded):
    model = zoo.clean_model("seed_cnn").double()
    batches = [(x.double(), y) for x, y in zoo._batches()]
    report = examine(model, batches)
    fixed = fix(model, report, which="bias", batches=batches)
    assert fixed.conv1.layer.bias is None and fixed.fc1.layer.bias is None
    assert model.conv1.layer.bias is not None
    with torch.no_grad():
        for x, _ in batches:
            torch.testing.assert_close(fixed.eval()(x), model.eval()(x), atol=1e-12, rtol=0)
        model.train()
        fixed.train()
        x = batches[0][0]
        torch.testing.assert_close(fixed(x), model(x), atol=1e-12, rtol=0)


def test_freeze_fixes_a_fake_freeze_and_leaves_a_bn_subclass_alone(single_threaded):
    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return F.relu(super().forward(x))

    model = zoo.clean_model("seed_cnn")
    act = BNAct(64)
    act.load_state_dict(model.conv2.norm.state_dict())
    model.conv2.norm = act
    for bn in (model.conv1.norm, model.conv2.norm):
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    model.train()
    report = examine(model, zoo._batches())
    assert set(report.find("fake_freeze")[0].layers) == {"conv1.norm", "conv2.norm"}
    fixed = fix(model, report, which="freeze")
    assert isinstance(fixed.conv1.norm, FrozenBatchNorm2d)
    assert type(fixed.conv2.norm) is BNAct  # converting it would drop its ReLU
    assert any(c.startswith("left conv2.norm") for c in fixed.doctor_changes)
    before = fixed.conv1.norm.running_mean.clone()
    fixed.train()
    with torch.no_grad():
        fixed(zoo._batches()[0][0])
    assert torch.equal(fixed.conv1.norm.running_mean, before)


def test_tiny_batch_renorm_keeps_the_eval_output(single_threaded):
    model = zoo.clean_model("deep_mlp")
    tiny = zoo._batches(size=2)
    report = examine(model, tiny)
    fixed = fix(model, report, which="renorm")
    assert all(isinstance(b.norm, BatchRenorm1d) for b in fixed.blocks)
    x = zoo._batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(x), model.eval()(x), atol=1e-6, rtol=1e-6)
    gn = fix(model, report, which="groupnorm")
    assert all(isinstance(b.norm, nn.GroupNorm) for b in gn.blocks)


def test_track_gives_untracked_layers_population_statistics(single_threaded):
    model = zoo.clean_model("seed_cnn")
    reference = model.conv2.norm
    model.conv2.norm = zoo._untracked(reference)
    batches = zoo._batches()
    report = examine(model, batches)
    assert "eval_batch_dependence" in report.codes()
    fixed = fix(model, report, which="track", batches=batches)
    torch.testing.assert_close(fixed.conv2.norm.running_mean, reference.running_mean,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed.conv2.norm.running_var, reference.running_var,
                               atol=1e-5, rtol=1e-4)
    assert "eval_batch_dependence" not in examine(fixed, batches).codes()


def test_fix_refuses_unknown_remedies_and_missing_data():
    model = zoo.clean_model("seed_cnn")
    report = examine(model)
    with pytest.raises(ValueError, match="unknown remedy"):
        fix(model, report, which="magic")
    with pytest.raises(ValueError, match="need batches"):
        fix(model, report, which="recalibrate")


# --------------------------------------------------------------------------- zoo patterns


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: BN and its activation in one module."""

    def __init__(self, c, **kw):
        super().__init__(c, **kw)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class StdConv2d(nn.Conv2d):
    """timm-style conv subclass: weight standardisation in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True)
                                                          + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class AuxNet(nn.Module):
    """Residual block with timm-style layers, and an auxiliary head used only in training."""

    def __init__(self, bias=False, momentum=0.1):
        super().__init__()
        self.stem = StdConv2d(1, 8, 3, padding=1, bias=bias)
        self.bn1 = BatchNormAct2d(8, momentum=momentum)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = F.relu(x + self.bn2(self.conv(x)))
        out = self.fc(x.mean(dim=(2, 3)))
        if self.training:
            return out, self.aux(x).mean()
        return out


def _trained_auxnet(**kw):
    torch.manual_seed(0)
    model = AuxNet(**kw)
    batches = zoo._batches()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for x, _ in batches:
                model(x)
    model.eval()
    from bnlab.nn import recalibrate_bn

    model.aux[1].running_mean = None  # training-only branch: recalibrate the rest
    model.aux[1].running_var = None
    recalibrate_bn(model, [b[0] for b in batches], progress=False)
    model.aux[1].running_mean = torch.zeros(4)
    model.aux[1].running_var = torch.ones(4)
    return model, batches


def test_timm_and_torchvision_patterns(single_threaded):
    model, batches = _trained_auxnet()
    report = examine(model, batches)
    assert report.metrics["fx_traced"] is True
    assert report.at_least("warning") == [], [(f.code, f.evidence) for f in report.at_least(
        "warning")]
    assert report.find("unreached_in_eval")[0].layers == ("aux.1",)
    # A fault inside the BN subclass and a bias in the conv subclass are named.
    faulty, _ = _trained_auxnet(bias=True, momentum=0.9)
    faulty.load_state_dict(model.state_dict(), strict=False)
    report = examine(faulty, batches)
    assert report.find("momentum_keras")[0].layers == ("bn1",)
    assert report.find("bias_before_bn")[0].layers == ("stem",)
    fixed = fix(faulty, report, which=["bias", "momentum"], batches=batches)
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(x), faulty.eval()(x), atol=1e-5, rtol=1e-5)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.shared = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.body(x.flatten(1))
        if x.sum() > 0:
            x = self.shared(x)
        return self.head(self.shared(x))


def test_untraceable_model_falls_back_to_module_order_and_hooks(single_threaded):
    torch.manual_seed(0)
    model = Untraceable()
    batches = zoo._batches()
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    report = examine(model.eval(), batches)
    assert report.metrics["fx_traced"] is False
    assert report.find("bias_before_bn")[0].layers == ("body.0",)
    assert report.find("bn_reused")[0].layers == ("shared",)


# --------------------------------------------------------------------------- outputs


def test_report_json_table_html(tmp_path, single_threaded):
    model = zoo.clean_model("resnet")
    with torch.no_grad():
        model.layer1.conv2.weight.mul_(3.0)
    report = examine(model, zoo._batches())
    data = json.loads(report.to_json())
    assert {f["code"] for f in data["findings"]} == report.codes()
    assert any(row["gap_mean"] and row["gap_mean"] > 0.2 for row in data["layers"])
    table = report.format_table()
    assert "stale_stats" not in table and "layer1.bn2" in table and "warning" in table
    page = report.to_html()
    assert page.count("data:image/png;base64,") == 1 and "http" not in page
    assert report.exit_code("warning") == 1 and report.exit_code("error") == 0


def test_bad_batches_raise_bnlab_error():
    model = zoo.clean_model("seed_cnn")
    with pytest.raises(BnlabError, match="cannot run on the data"):
        examine(model, [torch.randn(4, 1, 28, 28)])
    with pytest.raises(BnlabError, match="expected an input tensor"):
        examine(model, ["not a tensor"])
    with pytest.raises(BnlabError, match="floating-point"):
        examine(model, [torch.zeros(4, 1, 8, 8, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        examine("model")
