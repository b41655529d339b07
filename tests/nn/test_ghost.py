"""GhostBatchNorm1d/2d/3d: identities with torch's BatchNorm (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from bnlab.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn import ghost as ghost_module
from bnlab.nn.ghost import ghost_chunks

TOL = {"atol": 1e-10, "rtol": 1e-10}

CASES = [
    (GhostBatchNorm1d, nn.BatchNorm1d, (3,), "1d-NC"),
    (GhostBatchNorm1d, nn.BatchNorm1d, (3, 4), "1d-NCL"),
    (GhostBatchNorm2d, nn.BatchNorm2d, (3, 4, 5), "2d"),
    (GhostBatchNorm3d, nn.BatchNorm3d, (3, 2, 3, 4), "3d"),
]
IDS = [c[3] for c in CASES]


@pytest.fixture(params=["kernels", "composite"])
def route(request, monkeypatch):
    """Run a test with each kind of row reduction (torch's BN kernels, composite ops),
    whatever the input's size."""
    monkeypatch.setattr(ghost_module, "ROWS_MIN_LENGTH",
                        1 if request.param == "kernels" else 10**9)
    return request.param


def _pair(ours, theirs, v, **kw):
    b = theirs(3, **kw).double()
    with torch.no_grad():
        if b.affine:
            b.weight.uniform_(0.5, 2.0)
            b.bias.uniform_(-1.0, 1.0)
    a = ours(3, v, **kw).double()
    a.load_state_dict(b.state_dict())  # torch's checkpoint, strict
    return a, b


def _grads(y, params, g):
    return torch.autograd.grad(y, params, g)


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize(("ours", "theirs", "tail"), [c[:3] for c in CASES], ids=IDS)
@pytest.mark.parametrize("virtual", [8, 100])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_virtual_at_least_n_is_batchnorm(ours, theirs, tail, virtual, momentum):
    torch.manual_seed(0)
    a, b = _pair(ours, theirs, virtual, momentum=momentum)
    for step in range(3):
        x = (torch.randn(8, *tail, dtype=torch.float64) * 2 + step).requires_grad_()
        g = torch.randn_like(x)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb, **TOL)
        for u, v in zip(_grads(ya, [x, a.weight, a.bias], g), _grads(yb, [x, b.weight, b.bias], g),
                        strict=True):
            torch.testing.assert_close(u, v, **TOL)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize(("ours", "theirs", "tail"), [c[:3] for c in CASES], ids=IDS)
@pytest.mark.parametrize(("n", "virtual"), [(12, 4), (12, 3), (12, 2), (13, 4), (14, 4)])
def test_ghost_is_batchnorm_applied_to_each_chunk(ours, theirs, tail, n, virtual):
    torch.manual_seed(1)
    a, b = _pair(ours, theirs, virtual)
    x = (torch.randn(n, *tail, dtype=torch.float64) * 3 + 1).requires_grad_()
    g = torch.randn_like(x)
    k, last = ghost_chunks(n, virtual)
    sizes = [virtual] * k + ([last] if last else [])
    assert sum(sizes) == n and min(sizes) >= 2
    ref = torch.cat([
        F.batch_norm(c, None, None, b.weight, b.bias, True, 0.0, b.eps)
        for c in torch.split(x, sizes)
    ])
    ya = a(x)
    torch.testing.assert_close(ya, ref, **TOL)
    for u, v in zip(_grads(ya, [x, a.weight, a.bias], g), _grads(ref, [x, b.weight, b.bias], g),
                    strict=True):
        torch.testing.assert_close(u, v, **TOL)
    # Running statistics: the whole batch's mean and unbiased variance, as BN records them.
    b(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)


def test_chunking_rule_merges_a_leftover_of_one_into_the_previous_chunk():
    assert ghost_chunks(12, 4) == (3, 0)  # 4, 4, 4
    assert ghost_chunks(13, 4) == (2, 5)  # 4, 4, 5: the single leftover joins the last chunk
    assert ghost_chunks(5, 4) == (0, 5)  # 5: one chunk
    assert ghost_chunks(14, 4) == (3, 2)  # 4, 4, 4, 2
    assert ghost_chunks(3, 4) == (1, 0)  # V >= N: the whole batch


def test_leftover_chunk_of_one_trains_without_error():
    m = GhostBatchNorm1d(3, 4)
    y = m(torch.randn(9, 3))  # 4, 5
    assert torch.isfinite(y).all()


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("shape", "op"), [((4, 3, 3), "batch_norm_update_stats"),
                                           ((4,), "mean")],
                         ids=["2d-kernels", "1d-composite"])
def test_chunks_are_vectorised_not_looped(shape, op):
    """The same torch calls for 4 chunks as for 32, forward and backward; 9 positions per
    channel use torch's BN kernels for the row reductions, one position composite ops."""
    counts = []
    for n in (9, 65):  # 2, 2, 2, 3 and 31 x 2, 3
        m = GhostBatchNorm2d(4, 2) if len(shape) == 3 else GhostBatchNorm1d(4, 2)
        x = torch.randn(n, *shape, requires_grad=True)
        with _CountCalls() as counter:
            m(x).sum().backward()
        counts.append(counter.calls)
    assert counts[0] == counts[1]
    assert counts[0].get(op, 0) >= 1


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize(("n", "virtual"), [(12, 4), (13, 4), (14, 4)])
def test_double_backward_matches_finite_differences(n, virtual):
    torch.manual_seed(7)
    a, _ = _pair(GhostBatchNorm2d, nn.BatchNorm2d, virtual)
    x = (torch.randn(n, 3, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = a.weight.detach().clone().requires_grad_()
    b = a.bias.detach().clone().requires_grad_()

    def forward(x, w, b):  # the training forward with γ, β as inputs gradcheck can perturb
        return torch.func.functional_call(a, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(forward, (x, w, b))
    assert torch.autograd.gradgradcheck(forward, (x, w, b))


@pytest.mark.parametrize("n", [1, 5, 13, 64])
def test_eval_is_plain_running_stat_batchnorm_for_any_batch_size(n):
    torch.manual_seed(2)
    a, b = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 4)
    for _ in range(3):
        x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 2 + 1
        a(x), b(x)
    a.eval(), b.eval()
    x = torch.randn(n, 3, 4, 4, dtype=torch.float64)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    torch.testing.assert_close(a(x), b(x), **TOL)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])  # eval never changes state


def test_eval_without_running_stats_chunked_the_batch_instead_of_using_whole_batch_stats():
    # Regression: eval with track_running_stats=False used to normalise ghost batch by ghost
    # batch; the docstring (and torch) say eval uses the whole batch's statistics.
    torch.manual_seed(5)
    a, b = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 4, track_running_stats=False)
    a.eval(), b.eval()
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 2 + torch.arange(16.0).view(16, 1, 1, 1)
    torch.testing.assert_close(a(x), b(x), **TOL)


def test_bad_virtual_batch_size_raises():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            GhostBatchNorm2d(3, bad)


@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("layout", ["channels_last", "batch-strided"])
def test_non_contiguous_input_gives_the_contiguous_result(n, layout):
    torch.manual_seed(6)
    a, _ = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 4)
    c, _ = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 4)
    c.load_state_dict(a.state_dict())
    base = torch.randn(n, 3, 4, 5, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.cat([base, base], dim=3)[..., ::2]  # every other column: a strided view
        base = x.contiguous()
    assert not x.is_contiguous()
    x.requires_grad_()
    xc = base.clone().requires_grad_()
    g = torch.randn(n, 3, 4, 5, dtype=torch.float64)
    y, yc = a(x), c(xc)
    torch.testing.assert_close(y, yc, **TOL)
    for u, v in zip(_grads(y, [x, a.weight, a.bias], g), _grads(yc, [xc, c.weight, c.bias], g),
                    strict=True):
        torch.testing.assert_close(u, v, **TOL)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(a, key), getattr(c, key), **TOL)


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize(("dtype", "mean"), [(torch.float32, 100.0), (torch.float16, 3.0),
                                             (torch.bfloat16, 3.0)])
def test_low_precision_error_is_within_four_times_torchs_own(dtype, mean):
    """Against float64, on data away from zero mean, ghost BN in float32/float16/bfloat16
    is at most 4x as far off as torch's BatchNorm2d in that dtype (one chunk: the same
    maths). The module is converted to the dtype too, parameters included."""
    torch.manual_seed(8)
    x64 = (torch.randn(32, 8, 6, 6, dtype=torch.float64) + mean).to(dtype).double()
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
        exact, single = run(make, torch.float64), run(make, dtype)
        return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(single, exact,
                                                                           strict=True)]

    ours = errors(lambda: GhostBatchNorm2d(8, 32))
    theirs = errors(lambda: nn.BatchNorm2d(8))
    for name, e, t in zip(["y", "dx", "dweight", "dbias", "running_var"], ours, theirs,
                          strict=True):
        assert e <= 4 * t + 1e-7, f"{name}: {e:.1e} against torch's {t:.1e}"
