"""torch's BatchNorm semantics in the corners, one test per corner, torch 2.13 the oracle.

Each test runs the same steps on ``torch.nn.BatchNorm*`` and on bnlab's modules and
compares outputs, gradients and buffers (the core's corners: tests/core/test_corners.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn import (
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SyncBatchNorm,
)

C = 3
TOL = {"rtol": 1e-10, "atol": 1e-10}
# BN-equivalent settings, so that outputs can be compared with torch's BN exactly
TRAINING: list[tuple[str, Callable[..., nn.Module]]] = [
    ("renorm", lambda **kw: BatchRenorm2d(C, r_max=1.0, d_max=0.0, **kw)),
    ("ghost", lambda **kw: GhostBatchNorm2d(C, 64, **kw)),
    ("sync", lambda **kw: SyncBatchNorm(C, **kw)),
]
IDS = [n for n, _ in TRAINING]
MAKERS = [f for _, f in TRAINING]


@pytest.fixture(autouse=True)
def _one_thread(single_threaded: None) -> None:
    """Every test here runs single-threaded (the shared 2-core machine)."""


def _pair(make: Callable[..., nn.Module], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    ours, ref = make().double(), nn.BatchNorm2d(C).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        ref.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        ref.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        ref.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _buffers_equal(a: nn.Module, b: nn.Module) -> None:
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)


def _step(m: nn.Module, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Output, input gradient and parameter gradients of one forward/backward."""
    x = x.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(dy)
    return y.detach(), x.grad, m.weight.grad, m.bias.grad


@pytest.mark.parametrize("shape", [(0, C, 4, 4), (4, C, 0, 2)], ids=["N0", "H0"])
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_empty_batch_gives_empty_output_and_zero_grads_like_torch(make, shape):
    ours, ref = _pair(make)
    x = torch.zeros(shape, dtype=torch.float64)
    for got, expected in zip(_step(ours, x, x), _step(ref, x, x), strict=True):
        assert got is not None and expected is not None
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOL)  # zeros for weight and bias
    _buffers_equal(ours, ref)  # statistics unchanged, the batch counted, as torch
    assert int(ours.num_batches_tracked) == 1
    if isinstance(ours, BatchRenorm2d):
        assert int(ours.warmup_step) == 1, "the warm-up counts with num_batches_tracked"
    ours.eval(), ref.eval()
    assert ours(x).shape == ref(x).shape == shape


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_eps_not_positive_in_training_raises_like_torch(make):
    ours, ref = _pair(make)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    for eps in (0.0, -1.0):
        ours.eps = ref.eps = eps  # set after construction (the constructors refuse it)
        with pytest.raises(ValueError, match="eps must be positive during training"):
            ref(x)
        with pytest.raises(ValueError, match="eps must be > 0 in training"):
            ours(x)
    # Deliberately unlike torch, whose counter advances before its check raises: an error
    # leaves every buffer as it was.
    assert int(ref.num_batches_tracked) == 2
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="eps must be > 0"):
        SyncBatchNorm(C, eps=0.0)


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_track_running_stats_switched_off_after_construction_like_torch(make):
    ours, ref = _pair(make)
    ours.track_running_stats = ref.track_running_stats = False
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, C, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for got, expected in zip(_step(ours, x, dy), _step(ref, x, dy), strict=True):
        torch.testing.assert_close(got, expected, **TOL)
    _buffers_equal(ours, ref)  # training does not update the buffers
    assert int(ours.num_batches_tracked) == 0
    if isinstance(ours, BatchRenorm2d):
        assert int(ours.warmup_step) == 0
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL)  # eval uses the buffers: they exist


def test_renorm_uses_but_does_not_update_its_buffers_with_tracking_switched_off():
    m = BatchRenorm2d(C, r_max=2.0, d_max=1.0, warmup_steps=0).double()
    with torch.no_grad():
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
    m.track_running_stats = False
    x = torch.randn(6, C, 3, 3, dtype=torch.float64) * 2 + 1
    y = m(x)
    assert torch.equal(m.running_mean, torch.full((C,), 0.5, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.full((C,), 2.0, dtype=torch.float64))
    plain = nn.functional.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    assert not torch.allclose(y, plain), "r and d still correct towards the buffers"


@pytest.mark.parametrize(("cls", "shape", "fmt"), [
    (GhostBatchNorm2d, (8, C, 5, 4), torch.channels_last),
    (GhostBatchNorm3d, (8, C, 2, 3, 4), torch.channels_last_3d),
], ids=["2d", "3d"])
def test_ghost_keeps_channels_last_memory_format_like_torch(cls, shape, fmt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    ref_cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm3d
    _, ref_gx, _, _ = _step(ref_cls(C).double(), x, dy)
    ref_y = ref_cls(C).double()(x)
    for virtual in (3, 64):
        ours = cls(C, virtual).double()
        y, gx, _, _ = _step(ours, x, dy)
        assert y.is_contiguous(memory_format=fmt) == ref_y.is_contiguous(memory_format=fmt)
        assert gx is not None and ref_gx is not None
        assert gx.is_contiguous(memory_format=fmt) == ref_gx.is_contiguous(memory_format=fmt)
        assert y.is_contiguous(memory_format=fmt)
        plain = cls(C, virtual).double()
        y_plain, gx_plain, _, _ = _step(plain, x.contiguous(), dy.contiguous())
        torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-14)
        torch.testing.assert_close(gx, gx_plain, rtol=0, atol=1e-14)


LOADERS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("renorm", lambda: BatchRenorm2d(C)),
    ("ghost", lambda: GhostBatchNorm2d(C, 4)),
    ("frozen", lambda: FrozenBatchNorm2d(C)),
    ("sync", lambda: SyncBatchNorm(C)),
]


@pytest.mark.parametrize("make", [f for _, f in LOADERS], ids=[n for n, _ in LOADERS])
def test_load_state_dict_without_num_batches_tracked_like_torch(make):
    """torch's test_load_state_dict_BC: version 1 and unversioned checkpoints."""
    state = nn.BatchNorm2d(C).state_dict()
    del state["num_batches_tracked"]
    for version in (1, None):
        if version is None:
            del state._metadata[""]["version"]  # type: ignore[attr-defined]
        else:
            state._metadata[""]["version"] = version  # type: ignore[attr-defined]
        for counted in (0, 5):
            ref, ours = nn.BatchNorm2d(C), make()
            ref.num_batches_tracked.fill_(counted)
            ours.num_batches_tracked.fill_(counted)
            ref.load_state_dict(state)
            ours.load_state_dict(state)
            assert ours.num_batches_tracked.dtype == torch.long
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == counted
    current = nn.BatchNorm2d(C).state_dict()
    del current["num_batches_tracked"]  # a version-2 checkpoint must have the key: refused
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nn.BatchNorm2d(C).load_state_dict(current)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        make().load_state_dict(current)


ALL: list[tuple[str, Callable[[], nn.Module]]] = [*LOADERS]


@pytest.mark.parametrize("make", [f for _, f in ALL], ids=[n for n, _ in ALL])
def test_reset_running_stats_on_every_bn_module_like_torch(make):
    ours, ref = make(), nn.BatchNorm2d(C)
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
            m.num_batches_tracked.fill_(9)
    weight = ours.weight.clone()
    ours.reset_running_stats()
    ref.reset_running_stats()
    _buffers_equal(ours, ref)
    assert torch.equal(ours.weight, weight), "parameters are not statistics"
    if isinstance(ours, BatchRenorm2d):
        assert int(ours.warmup_step) == 0 and ours.current_limits() == (1.0, 0.0)


def test_renorm_ghost_and_sync_are_torch_batchnorm_for_isinstance_frozen_is_not():
    for m in (BatchRenorm2d(C), GhostBatchNorm2d(C, 4), SyncBatchNorm(C)):
        assert isinstance(m, _BatchNorm)
    # A frozen layer's statistics never update: update_bn would reset them for good.
    assert not isinstance(FrozenBatchNorm2d(C), _BatchNorm)


def test_swa_update_bn_sees_renorm_and_ghost_like_torch_batchnorm():
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, C, 3), nn.Conv2d(C, C, 3)]

    def net(first: nn.Module, second: nn.Module) -> nn.Module:
        return nn.Sequential(convs[0], first, nn.ReLU(), convs[1], second).double()

    # Renorm with r_max=1, d_max=0 is BN; Ghost's own statistics are the whole batch's.
    ours = net(BatchRenorm2d(C, r_max=1.0, d_max=0.0, momentum=0.3), GhostBatchNorm2d(C, 2))
    ref = net(nn.BatchNorm2d(C, momentum=0.3), nn.BatchNorm2d(C))
    frozen = FrozenBatchNorm2d(C).double()
    with torch.no_grad():
        frozen.running_mean.fill_(0.25)
    loader = [torch.randn(8, 1, 7, 7, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    torch.optim.swa_utils.update_bn(loader, ours)
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.optim.swa_utils.update_bn(loader, nn.Sequential(frozen))
    for a, b in ((ours[1], ref[1]), (ours[4], ref[4])):
        _buffers_equal(a, b)
        assert a.momentum == b.momentum  # restored
    assert int(ours[1].num_batches_tracked) == len(loader)
    assert torch.equal(frozen.running_mean, torch.full((C,), 0.25, dtype=torch.float64))
