"""Derivatives of bnlab's BN modules against torch's BN: second order, forward mode, autocast.

torch is the oracle: double backward against ``nn.BatchNorm*``'s, forward-mode tangents
against ``torch.func.jvp`` of torch's BN (with Batch Renorm's r and d, or Ghost BN's chunks,
applied as the constants they are), and under CPU autocast each module's error against its
own float64 result stays within 4x torch BN's error against float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn import functional as F

from bnlab.nn import (
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    SyncBatchNorm,
)
from bnlab.nn.ghost import ghost_chunks

C = 3
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(single_threaded: None) -> None:
    """Every test here runs single-threaded (the shared 2-core machine)."""


def _randomised(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=g, dtype=F64) + 0.5)
        m.bias.copy_(torch.randn(C, generator=g, dtype=F64))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(C, generator=g, dtype=F64) * 0.5)
            m.running_var.copy_(torch.rand(C, generator=g, dtype=F64) + 0.5)
    return m


def _as_function(m: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """(x, weight, bias) -> m(x) with the given parameters (running stats as they are)."""
    return lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))


def _inputs(shape: tuple[int, ...], seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 1).requires_grad_()
    w = (torch.rand(C, generator=g, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=F64).requires_grad_()
    return x, w, b


# --------------------------------------------------------------------- second order


@pytest.mark.parametrize("shape", [(8, C), (4, C, 2, 3)], ids=["NC", "NCHW"])
def test_sync_passes_gradcheck_and_gradgradcheck_without_process_group(shape):
    f = _as_function(SyncBatchNorm(C).double())
    inputs = _inputs(shape)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def _gradient_penalty_grads(f: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor,
                            w: Tensor, b: Tensor) -> list[Tensor]:
    """d/d(x, w, b, dy) of a penalty on the first derivatives (x and w) of <dy, f>."""
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(x.shape, generator=g, dtype=F64).requires_grad_()
    v = torch.randn(x.shape, generator=g, dtype=F64)
    gx, gw = torch.autograd.grad((f(x, w, b) * dy).sum(), (x, w), create_graph=True)
    penalty = (gx * v).sum() + gw.square().sum()
    gxx, gww, gdy = torch.autograd.grad(penalty, (x, w, dy))
    return [gx, gw, gxx, gww, gdy]


def test_sync_double_backward_equals_torch_batchnorm_without_process_group():
    x, w, b = _inputs((8, C))  # the (8, 3) float64 input where it used to differ by 4.2
    ours = _gradient_penalty_grads(_as_function(SyncBatchNorm(C).double()), x, w, b)
    ref = _gradient_penalty_grads(_as_function(nn.BatchNorm1d(C).double()), x, w, b)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------- forward mode


def _tangent(m: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    with fwAD.dual_level():
        out = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
    assert out is not None
    return out.detach()


def _torch_bn(w: Tensor, b: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    return lambda x: F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def test_sync_forward_mode_ad_in_training_equals_torch_jvp():
    m = _randomised(SyncBatchNorm(C).double())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, C, 4, 4, generator=g, dtype=F64) * 3 + 1
    t = torch.randn(x.shape, generator=g, dtype=F64)
    _, expected = torch.func.jvp(_torch_bn(m.weight.detach(), m.bias.detach(), m.eps), (x,),
                                 (t,))
    ref = nn.BatchNorm2d(C).double()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(_tangent(m, x, t), expected, rtol=1e-10, atol=1e-10)
    ref(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):  # updated as usual
        torch.testing.assert_close(getattr(m, key), getattr(ref, key), rtol=1e-12, atol=1e-12)


def test_renorm_forward_mode_ad_in_training_equals_torch_jvp_with_r_and_d_constant():
    m = _randomised(BatchRenorm2d(C, r_max=1.5, d_max=0.5, warmup_steps=0).double())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, C, 4, 4, generator=g, dtype=F64) * 3 + 1
    t = torch.randn(x.shape, generator=g, dtype=F64)
    # r and d from the statistics before the step, clipped as the paper does (no gradient)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    sigma = (m.running_var + m.eps).sqrt()
    r = ((var + m.eps).sqrt() / sigma).clamp(1 / 1.5, 1.5)
    d = ((mean - m.running_mean) / sigma).clamp(-0.5, 0.5)
    assert (r != (var + m.eps).sqrt() / sigma).any() or (d != (mean - m.running_mean) / sigma
                                                          ).any(), "the clips must bite"
    w, b = m.weight.detach(), m.bias.detach()
    _, expected = torch.func.jvp(_torch_bn(w * r, b + w * d, m.eps), (x,), (t,))
    torch.testing.assert_close(_tangent(m, x, t), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("cls", "shape", "virtual"), [
    (GhostBatchNorm2d, (10, C, 4, 4), 4),   # two chunks of 4 and one of 2
    (GhostBatchNorm2d, (9, C, 3, 3), 4),    # a chunk of 4, then one of 5 (leftover 1 joins)
    (GhostBatchNorm1d, (8, C, 20), 8),      # one chunk: BatchNorm
    (GhostBatchNorm1d, (12, C), 3),
], ids=["tail2", "tail1", "one-chunk", "NC"])
def test_ghost_forward_mode_ad_in_training_equals_torch_jvp_per_chunk(cls, shape, virtual):
    m = _randomised(cls(C, virtual).double())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 1
    t = torch.randn(shape, generator=g, dtype=F64)
    k, tail = ghost_chunks(shape[0], virtual)
    sizes = [min(virtual, shape[0])] * k + ([tail] if tail else [])
    bn = _torch_bn(m.weight.detach(), m.bias.detach(), m.eps)
    _, expected = torch.func.jvp(lambda z: torch.cat([bn(p) for p in z.split(sizes)]), (x,), (t,))
    torch.testing.assert_close(_tangent(m, x, t), expected, rtol=1e-10, atol=1e-10)


def _untracked_renorm_as_bn() -> nn.Module:
    m = BatchRenorm2d(C, r_max=1.0, d_max=0.0)
    m.track_running_stats = False  # no buffer update, so torch.func may transform it
    return m


@pytest.mark.parametrize("make", [
    _untracked_renorm_as_bn,
    lambda: GhostBatchNorm2d(C, 64, track_running_stats=False),
    lambda: SyncBatchNorm(C, track_running_stats=False),
], ids=["renorm", "ghost", "sync"])
def test_torch_func_jvp_transforms_the_modules_like_torch_batchnorm(make):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, C, 3, 3, generator=g, dtype=F64) * 2 + 1
    t = torch.randn(x.shape, generator=g, dtype=F64)
    ref = nn.BatchNorm2d(C, track_running_stats=False).double()
    y_ref, t_ref = torch.func.jvp(ref, (x,), (t,))
    y, tangent = torch.func.jvp(make().double(), (x,), (t,))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, t_ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------- autocast

MODULES = [
    ("renorm", lambda: BatchRenorm2d(C, warmup_steps=0)),
    ("ghost", lambda: GhostBatchNorm2d(C, 8)),
    ("sync", lambda: SyncBatchNorm(C)),
]


def _errors(m: nn.Module, x: Tensor, dy: Tensor, dtype: torch.dtype, randomise: bool = True
            ) -> tuple[Tensor, ...]:
    """Output and input gradient of m under autocast(dtype), and their errors against m in
    float64 on the same rounded input, relative to the largest float64 value (Batch Renorm's
    d shifts its outputs, so absolute errors would compare different magnitudes)."""
    low = _randomised(m, 5) if randomise else m
    high = copy.deepcopy(low).double()
    with torch.autocast("cpu", dtype=dtype):
        xl = x.to(dtype).requires_grad_()
        yl = low(xl)
        (gl,) = torch.autograd.grad(yl, xl, dy.to(dtype))
    xh = x.to(dtype).double().requires_grad_()  # the same rounded input, in float64
    yh = high(xh)
    (gh,) = torch.autograd.grad(yh, xh, dy.to(dtype).double())
    return (yl, gl, (yl.double() - yh).abs().max() / yh.abs().max(),
            (gl.double() - gh).abs().max() / gh.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_frozen_under_autocast_runs_like_torch_eval_within_4x_its_error(dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, C, 4, 4, generator=g) * 3 + 5
    dy = torch.randn(16, C, 4, 4, generator=g)
    ref = _randomised(nn.BatchNorm2d(C), 9).eval()
    frozen = FrozenBatchNorm2d(C)
    frozen.load_state_dict(ref.state_dict())
    y, gx, err_y, err_g = _errors(frozen, x, dy, dtype, randomise=False)
    ty, tgx, terr_y, terr_g = _errors(ref, x, dy, dtype, randomise=False)
    assert y.dtype == ty.dtype == dtype and gx.dtype == tgx.dtype == dtype
    assert err_y <= 4 * terr_y and err_g <= 4 * terr_g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("make", [f for _, f in MODULES], ids=[n for n, _ in MODULES])
def test_autocast_runs_like_torch_and_stays_within_4x_torchs_error(make, dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, C, 8, 8, generator=g) * 3 + 5
    dy = torch.randn(32, C, 8, 8, generator=g)
    y, gx, err_y, err_g = _errors(make().float(), x, dy, dtype)
    ty, tgx, terr_y, terr_g = _errors(nn.BatchNorm2d(C), x, dy, dtype)
    assert y.dtype == ty.dtype == dtype and gx.dtype == tgx.dtype == dtype
    assert err_y <= 4 * terr_y, f"output error {err_y:.3g} vs torch's {terr_y:.3g}"
    assert err_g <= 4 * terr_g, f"input-gradient error {err_g:.3g} vs torch's {terr_g:.3g}"
