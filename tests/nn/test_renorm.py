"""BatchRenorm1d/2d/3d against torch's BatchNorm and the paper's formulas (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

TOL = {"atol": 1e-10, "rtol": 1e-10}

# (our class, torch class, input shape, id)
CASES = [
    (BatchRenorm1d, nn.BatchNorm1d, (6, 3), "1d-NC"),
    (BatchRenorm1d, nn.BatchNorm1d, (5, 3, 4), "1d-NCL"),
    (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 5, 6), "2d"),
    (BatchRenorm3d, nn.BatchNorm3d, (3, 3, 2, 4, 5), "3d"),
]


def _pair(ours, theirs, **kw):
    a, b = ours(3, **kw).double(), theirs(3, **{k: v for k, v in kw.items() if k in (
        "momentum", "affine", "eps")}).double()
    if b.affine:
        with torch.no_grad():
            b.weight.uniform_(0.5, 2.0)
            b.bias.uniform_(-1.0, 1.0)
    a.load_state_dict(b.state_dict())  # a torch checkpoint loads directly (strict)
    return a, b


@pytest.mark.parametrize(("ours", "theirs", "shape"), [c[:3] for c in CASES],
                         ids=[c[3] for c in CASES])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_renorm_with_rmax_1_dmax_0_is_batchnorm(ours, theirs, shape, momentum, affine):
    torch.manual_seed(0)
    a, b = _pair(ours, theirs, momentum=momentum, affine=affine, r_max=1.0, d_max=0.0)
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + step).requires_grad_()
        g = torch.randn(shape, dtype=torch.float64)
        ya = a(x)
        (gxa,) = torch.autograd.grad(ya, x, g, retain_graph=True)
        yb = b(x)
        (gxb,) = torch.autograd.grad(yb, x, g, retain_graph=True)
        torch.testing.assert_close(ya, yb, **TOL)
        torch.testing.assert_close(gxa, gxb, **TOL)
        if affine:
            pa = torch.autograd.grad(ya, [a.weight, a.bias], g)
            pb = torch.autograd.grad(yb, [b.weight, b.bias], g)
            for u, v in zip(pa, pb, strict=True):
                torch.testing.assert_close(u, v, **TOL)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)
    a.eval(), b.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), **TOL)


def _paper_step(x, rm, rv, r_lim, d_lim, eps, momentum, w, bias):
    """Ioffe 2017, Algorithm 1, written independently of the module (plus torch's EMA)."""
    dims = [0, 2, 3]
    mu = x.mean(dims)
    var = ((x - mu.view(1, -1, 1, 1)) ** 2).mean(dims)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_lim, r_lim)
    d = torch.clamp((mu - rm) / sigma, -d_lim, d_lim)
    xhat = (x - mu.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1)
    y = w.view(1, -1, 1, 1) * (xhat * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)) \
        + bias.view(1, -1, 1, 1)
    n = x.numel() / x.shape[1]
    rm = rm + momentum * (mu - rm)
    rv = rv + momentum * (var * n / (n - 1) - rv)
    return y, rm, rv, r, d


def test_warmup_schedule_step_by_step_matches_paper():
    torch.manual_seed(1)
    r_max, d_max, warmup, eps, momentum = 3.0, 5.0, 4, 1e-5, 0.1
    m = BatchRenorm2d(3, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max,
                      warmup_steps=warmup).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0)
        m.bias.uniform_(-1.0, 1.0)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    clipped_r = clipped_d = 0
    for t in range(9):
        frac = min(t, warmup) / warmup
        r_lim, d_lim = 1 + (r_max - 1) * frac, d_max * frac
        assert m.current_limits() == pytest.approx((r_lim, d_lim), abs=1e-15)
        # Far from the running statistics, so r and d hit their (growing) limits.
        x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * (6.0 + t) + 40.0
        y_ref, rm, rv, r, d = _paper_step(x, rm, rv, r_lim, d_lim, eps, momentum,
                                          m.weight.detach(), m.bias.detach())
        torch.testing.assert_close(m(x), y_ref, **TOL)
        torch.testing.assert_close(m.running_mean, rm, **TOL)
        torch.testing.assert_close(m.running_var, rv, **TOL)
        clipped_r += int((r == r_lim).any())
        clipped_d += int((d.abs() == d_lim).any())
        assert int(m.warmup_step) == min(t + 1, warmup)
    assert clipped_r >= 3 and clipped_d >= 3  # the clipping was exercised, not bypassed


def test_r_and_d_carry_no_gradient():
    torch.manual_seed(2)
    m = BatchRenorm2d(3, warmup_steps=0).double()
    m.running_mean.fill_(0.5)
    m.running_var.fill_(4.0)
    x = (torch.randn(6, 3, 3, 3, dtype=torch.float64) * 0.7 + 1).requires_grad_()
    g = torch.randn_like(x)
    with torch.no_grad():
        var, mu = torch.var_mean(x, dim=[0, 2, 3], correction=0)
        sigma = torch.sqrt(m.running_var + m.eps)
        r = torch.clamp(torch.sqrt(var + m.eps) / sigma, 1 / 3, 3)
        d = torch.clamp((mu - m.running_mean) / sigma, -5, 5)
    (gx,) = torch.autograd.grad(m(x), x, g)
    # Reference: BN with the constants r, d as affine: d/dx treats them as fixed.
    xr = x.detach().requires_grad_()
    yr = torch.nn.functional.batch_norm(xr, None, None, r, d, True, 0.0, m.eps)
    (gr,) = torch.autograd.grad(yr, xr, g)
    torch.testing.assert_close(gx, gr, **TOL)
    assert not torch.allclose(r, torch.ones_like(r))  # r really differs from 1 here


@pytest.mark.parametrize(("cls", "shape"), [(BatchRenorm1d, (7, 3)),
                                           (BatchRenorm2d, (6, 3, 3, 3))], ids=["1d", "2d"])
def test_gradients_of_every_input_and_double_backward(cls, shape):
    """With r and d away from (1, 0): dx, dγ and dβ equal autograd through the paper's
    formula with r, d constant, and second derivatives match finite differences. The
    running statistics put r and d on their clips (3 and 5), so a finite-difference step
    does not move them either: they are constants on both sides of gradgradcheck."""
    torch.manual_seed(3)
    m = cls(3, warmup_steps=0).double()
    with torch.no_grad():
        m.running_mean.fill_(-10.0)
        m.running_var.fill_(1e-4)
        m.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    x = (torch.randn(*shape, dtype=torch.float64) * 0.7 + 1).requires_grad_()
    g = torch.randn_like(x)
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        var, mu = torch.var_mean(x, dim=dims, correction=0)
        sigma = torch.sqrt(m.running_var + m.eps)
        r = torch.clamp(torch.sqrt(var + m.eps) / sigma, 1 / 3, 3)
        d = torch.clamp((mu - m.running_mean) / sigma, -5, 5)
    assert torch.equal(r, torch.full_like(r, 3.0)) and torch.equal(d, torch.full_like(d, 5.0))
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def forward(x, w, b):  # the module's training step, without its running-stat update
        frozen = cls(3, warmup_steps=0).double()
        frozen.load_state_dict(m.state_dict())
        return torch.func.functional_call(frozen, {"weight": w, "bias": b}, (x,))

    ours = torch.autograd.grad(forward(x, w, b), (x, w, b), g)
    shape1 = [1, 3] + [1] * (x.dim() - 2)
    var_g, mu_g = torch.var_mean(x, dim=dims, correction=0)  # with gradient, unlike r, d
    xhat = (x - mu_g.view(shape1)) / torch.sqrt(var_g.view(shape1) + m.eps)
    paper = w.view(shape1) * (xhat * r.view(shape1) + d.view(shape1)) + b.view(shape1)
    for u, v in zip(ours, torch.autograd.grad(paper, (x, w, b), g), strict=True):
        torch.testing.assert_close(u, v, **TOL)
    assert torch.autograd.gradgradcheck(forward, (x, w, b))


def test_warmup_counter_is_clamped_in_place_and_never_passes_warmup_steps():
    # Regression: a packaged BatchRenorm1d let its step counter grow without bound.
    m = BatchRenorm1d(2, warmup_steps=3)
    for _ in range(10):
        m(torch.randn(4, 2))
    assert int(m.warmup_step) == 3
    assert int(m.num_batches_tracked) == 10
    assert m.current_limits() == (3.0, 5.0)


def test_state_dict_keys_are_torchs_both_ways_and_counter_follows():
    bn = nn.BatchNorm2d(4)
    for _ in range(7):
        bn(torch.randn(5, 4, 3, 3))
    m = BatchRenorm2d(4, warmup_steps=5)
    m.load_state_dict(bn.state_dict())  # strict
    assert set(m.state_dict()) == set(bn.state_dict())
    assert int(m.warmup_step) == 5
    back = nn.BatchNorm2d(4)
    back.load_state_dict(m.state_dict())  # strict, the other way
    torch.testing.assert_close(back.running_var, bn.running_var)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r_max": 0.5}, "r_max"), ({"d_max": -1.0}, "d_max"), ({"warmup_steps": -1}, "warmup"),
     ({"momentum": 2.0}, "momentum"), ({"small_batch": "drop"}, "small_batch")],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kwargs)


def test_bad_input_rank_and_channels_raise():
    with pytest.raises(ValueError, match=r"4-D.*got 3-D"):
        BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 3 channels"):
        BatchRenorm1d(3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        BatchRenorm1d(3)([[1.0, 2.0, 3.0]])


def test_float32_error_is_within_four_times_torchs_own():
    """Against float64, on data far from zero mean (mean 100, std 1), renorm with
    r_max=1, d_max=0 in float32 is at most 4x as far off as torch's BatchNorm2d in float32."""
    torch.manual_seed(8)
    x64 = torch.randn(32, 8, 6, 6, dtype=torch.float64) + 100
    g64 = torch.randn_like(x64)

    def run(make, dtype):
        m = make().to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, 8))
        x = x64.to(dtype).clone().requires_grad_()
        y = m(x)
        y.backward(g64.to(dtype))
        return [t.detach().double() for t in (y, x.grad, m.weight.grad, m.bias.grad,
                                              m.running_var)]

    def errors(make):
        exact, single = run(make, torch.float64), run(make, torch.float32)
        return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(single, exact,
                                                                           strict=True)]

    ours = errors(lambda: BatchRenorm2d(8, r_max=1.0, d_max=0.0))
    theirs = errors(lambda: nn.BatchNorm2d(8))
    for name, e, t in zip(["y", "dx", "dweight", "dbias", "running_var"], ours, theirs,
                          strict=True):
        assert e <= 4 * t + 1e-7, f"{name}: {e:.1e} against torch's {t:.1e}"
