"""SyncBatchNorm against torch.nn.BatchNorm* on the concatenated batch.

The identity under test: sync BN over R ranks equals BN on the concatenation of the R
batches (forward, input gradient, parameter gradients summed over ranks, running stats).

The two-process tests run this file as a script (``python test_sync.py worker ...``): each
worker joins a gloo group on 127.0.0.1, loops over the whole case table, and writes the
max |diff| of every compared quantity to a JSON file that the test asserts on. One launch
covers the whole table, because process start-up costs seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnlab.nn import SyncBatchNorm, convert_sync_batchnorm
from bnlab.nn.rewrite import RewriteWarning

TOL = 1e-9
C = 3
# (id, torch class, per-sample shape after (N, C))
SHAPES: list[tuple[str, type[nn.Module], tuple[int, ...]]] = [
    ("bn1d_NC", nn.BatchNorm1d, ()),
    ("bn1d_NCL", nn.BatchNorm1d, (5,)),
    ("bn2d", nn.BatchNorm2d, (4, 5)),
    ("bn3d", nn.BatchNorm3d, (2, 3, 4)),
]
SPLITS: list[tuple[int, int]] = [(4, 4), (3, 5), (0, 6), (1, 1)]
# (id, constructor kwargs) run on every shape x split; two training steps each, so the
# running statistics see the momentum twice.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("cumulative", {"momentum": None}),
    ("noaffine_notrack", {"affine": False, "track_running_stats": False}),
]
STEPS = 2
# Double backward and forward mode over the ranks: uneven and empty-rank splits, every rank.
SECOND_ORDER_SPLITS: dict[str, list[tuple[int, int]]] = {
    "bn1d_NC": [(3, 5), (0, 6)], "bn1d_NCL": [(4, 4)], "bn2d": [(3, 5), (0, 6)],
    "bn3d": [(4, 4)],
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_pair(
    torch_cls: type[nn.Module], kwargs: dict[str, Any], seed: int
) -> tuple[SyncBatchNorm, nn.Module]:
    """A SyncBatchNorm and a torch BN with the same (random, non-trivial) state."""
    ours = SyncBatchNorm(C, **kwargs).double()
    ref = torch_cls(C, **kwargs).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ours.weight is not None and ours.bias is not None:
            ours.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            ours.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        if ours.running_mean is not None and ours.running_var is not None:
            ours.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
            ours.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        if a is not None or b is not None:
            raise ValueError("one side has a tensor, the other has None")
        return 0.0
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- worker


def _count_collectives() -> dict[str, int]:
    """Wrap the collectives SyncBatchNorm may call so the worker can count them."""
    import torch.distributed as dist

    counts = {"all_gather": 0, "all_reduce": 0}
    for name in counts:
        original = getattr(dist, name)

        def counted(*args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
            counts[_name] += 1
            return _orig(*args, **kw)

        setattr(dist, name, counted)
    return counts


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    counts = _count_collectives()
    results: dict[str, dict[str, float]] = {}
    try:
        for case_no, (opt_id, kwargs) in enumerate(OPTIONS):
            for shape_no, (shape_id, torch_cls, spatial) in enumerate(SHAPES):
                for sizes in SPLITS:
                    case = f"{shape_id}-{sizes[0]}_{sizes[1]}-{opt_id}"
                    seed = 1000 * case_no + 100 * shape_no + sizes[0] * 10 + sizes[1]
                    results[case] = _run_case(rank, torch_cls, spatial, sizes, kwargs, seed,
                                              counts)
                    dist.barrier()
        for shape_id, torch_cls, spatial in SHAPES:
            for sizes in SECOND_ORDER_SPLITS[shape_id]:
                seed = 5000 + sizes[0] * 10 + sizes[1]
                results[f"second-{shape_id}-{sizes[0]}_{sizes[1]}"] = _run_second_order_case(
                    rank, torch_cls, spatial, sizes, seed)
                dist.barrier()
        # Eval mode with running statistics never communicates.
        bn, _ = _make_pair(nn.BatchNorm2d, {}, 7)
        bn.eval()
        before = dict(counts)
        bn(torch.randn(2, C, 4, 4, dtype=torch.float64))
        results["eval"] = {"collectives": float(sum(counts.values()) - sum(before.values()))}
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(results))


def _run_case(
    rank: int,
    torch_cls: type[nn.Module],
    spatial: tuple[int, ...],
    sizes: tuple[int, int],
    kwargs: dict[str, Any],
    seed: int,
    counts: dict[str, int],
) -> dict[str, float]:
    import torch.distributed as dist

    ours, ref = _make_pair(torch_cls, kwargs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    diffs: dict[str, float] = {}
    for step in range(STEPS):
        n = sum(sizes)
        x_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64) * 3 + 2
        dy_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
        x_ref = x_all.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * dy_all).sum().backward()

        x = x_all[lo:hi].clone().requires_grad_()
        g0, r0 = counts["all_gather"], counts["all_reduce"]
        y = ours(x)
        (y * dy_all[lo:hi]).sum().backward()
        diffs[f"gathers_{step}"] = float(counts["all_gather"] - g0)
        diffs[f"reduces_{step}"] = float(counts["all_reduce"] - r0)

        diffs[f"forward_{step}"] = _max_diff(y, y_ref[lo:hi])
        diffs[f"grad_input_{step}"] = _max_diff(x.grad, None if x_ref.grad is None
                                                else x_ref.grad[lo:hi])
        for name in ("weight", "bias"):
            p, q = getattr(ours, name), getattr(ref, name)
            if p is None:
                diffs[f"grad_{name}_{step}"] = _max_diff(p, q)
                continue
            summed = p.grad.clone()
            dist.all_reduce(summed)  # parameter gradients summed over ranks
            diffs[f"grad_{name}_{step}"] = _max_diff(summed, q.grad)
            p.grad, q.grad = None, None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            diffs[f"{name}_{step}"] = _max_diff(getattr(ours, name), getattr(ref, name))
    return diffs


def _penalty_grads(
    bn: nn.Module, x: torch.Tensor, dy: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """First derivatives of <dy, bn(x)> (create_graph), then the derivatives of a penalty on
    them with respect to x, weight and dy: what a gradient penalty or MAML computes."""
    gx, gw = torch.autograd.grad((bn(x) * dy).sum(), (x, bn.weight), create_graph=True)
    penalty = (gx * v).sum() + (gw * gw).sum() / 2  # gw is this rank's share of dγ
    gxx, gww, gdy = torch.autograd.grad(penalty, (x, bn.weight, dy))
    return gx, gw, gxx, gww, gdy


def _run_second_order_case(
    rank: int, torch_cls: type[nn.Module], spatial: tuple[int, ...], sizes: tuple[int, int],
    seed: int,
) -> dict[str, float]:
    """Double backward and forward-mode AD over 2 ranks against torch BN on the whole batch.

    The penalty on dγ uses each rank's share: Σ_r |gw_r|²/2 is not |Σ_r gw_r|²/2, so the
    reference penalises the same per-rank shares, computed from the slices of its dγ terms
    (gw_r = Σ over rank r's rows of dy·x̂)."""
    import torch.autograd.forward_ad as fwAD
    import torch.distributed as dist

    ours, ref = _make_pair(torch_cls, {}, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64) * 3 + 2
    dy_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
    v_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
    t_all = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)

    x = x_all[lo:hi].clone().requires_grad_()
    dy = dy_all[lo:hi].clone().requires_grad_()
    mine = _penalty_grads(ours, x, dy, v_all[lo:hi])

    # Reference: one process, the whole batch; the per-rank dγ shares from x̂ on the slices.
    xr, dyr = x_all.clone().requires_grad_(), dy_all.clone().requires_grad_()
    gx, = torch.autograd.grad((ref(xr) * dyr).sum(), xr, create_graph=True)
    shape = (1, C, *([1] * len(spatial)))
    y_hat = (ref(xr) - ref.bias.view(shape)) / ref.weight.view(shape)
    dims = [0, *range(2, xr.dim())]
    shares = [(dyr * y_hat)[a:b].sum(dims) for a, b in ((0, sizes[0]), (sizes[0], n))]
    penalty = (gx * v_all).sum() + sum((s * s).sum() for s in shares) / 2
    gxx, gww, gdy = torch.autograd.grad(penalty, (xr, ref.weight, dyr))
    theirs = (gx[lo:hi], shares[rank], gxx[lo:hi], gww, gdy[lo:hi])

    diffs: dict[str, float] = {}
    for name, a, b in zip(("first_x", "first_weight", "second_x", "second_weight",
                           "second_dy"), mine, theirs, strict=True):
        if name == "second_weight":
            a = a.clone()
            dist.all_reduce(a)  # parameter gradients summed over ranks
        diffs[name] = _max_diff(a, b)
    # Forward mode: the tangent of the output, against torch.func.jvp on the whole batch.
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x_all[lo:hi], t_all[lo:hi]))).tangent
    w, b = ref.weight.detach(), ref.bias.detach()
    _, expected = torch.func.jvp(
        lambda z: torch.nn.functional.batch_norm(z, None, None, w, b, True, 0.0, ref.eps),
        (x_all,), (t_all,))
    diffs["jvp"] = _max_diff(tangent, expected[lo:hi])
    return diffs


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_two_gloo_ranks_equal_batchnorm_on_concatenated_batch(tmp_path: Path) -> None:
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(r), "2", str(port), str(outs[r])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{logs[r]}"
    expected = {
        f"{s}-{a}_{b}-{o}" for s, _, _ in SHAPES for a, b in SPLITS for o, _ in OPTIONS
    }
    second = {f"second-{s}-{a}_{b}" for s, _, _ in SHAPES for a, b in SECOND_ORDER_SPLITS[s]}
    for r, path in enumerate(outs):
        results = json.loads(path.read_text())
        assert set(results) == expected | second | {"eval"}
        for case in sorted(second):  # double backward and forward mode across the ranks
            for key, value in results[case].items():
                assert value <= TOL, f"rank {r} {case} {key}: max |diff| {value:.3g}"
        assert results["eval"] == {"collectives": 0.0}, "eval mode must not communicate"
        for case in sorted(expected):
            diffs = results[case]
            for key, value in diffs.items():
                if key.startswith(("gathers_", "reduces_")):
                    # one all_gather forward, one all_reduce backward, nothing else
                    assert value == 1.0, f"rank {r} {case} {key}: {value} collectives"
                else:
                    assert value <= TOL, f"rank {r} {case} {key}: max |diff| {value:.3g}"


@pytest.mark.parametrize(("shape_id", "torch_cls", "spatial"), SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize(("opt_id", "kwargs"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_without_process_group_is_plain_batchnorm(
    shape_id: str, torch_cls: type[nn.Module], spatial: tuple[int, ...], opt_id: str,
    kwargs: dict[str, Any],
) -> None:
    ours, ref = _make_pair(torch_cls, kwargs, 3)
    g = torch.Generator().manual_seed(4)
    for _ in range(STEPS):
        x = torch.randn(6, C, *spatial, generator=g, dtype=torch.float64) * 3 + 2
        dy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        assert _max_diff(ya, yb) <= 1e-12
        assert _max_diff(xa.grad, xb.grad) <= 1e-12
        for name in ("weight", "bias"):
            p, q = getattr(ours, name), getattr(ref, name)
            assert _max_diff(None if p is None else p.grad, None if q is None else q.grad) <= 1e-12
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert _max_diff(getattr(ours, name), getattr(ref, name)) <= 1e-12
    ours.eval()
    ref.eval()
    x = torch.randn(5, C, *spatial, generator=g, dtype=torch.float64)
    assert _max_diff(ours(x), ref(x)) <= 1e-12


def test_eval_does_not_change_state() -> None:
    bn, _ = _make_pair(nn.BatchNorm2d, {}, 5)
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.randn(4, C, 3, 3, dtype=torch.float64))
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float32_matches_torch_within_its_own_rounding() -> None:
    torch.manual_seed(0)
    ours, ref = SyncBatchNorm(8), nn.BatchNorm2d(8)
    x = torch.randn(16, 8, 7, 7) * 4 + 3
    x64 = x.double()
    y32_ref = ref(x)
    y64_ref = nn.BatchNorm2d(8).double()(x64)
    torch_err = _max_diff(y32_ref, y64_ref)
    ours_err = _max_diff(ours(x), y64_ref)
    assert ours(x).dtype == torch.float32
    assert ours_err <= max(2 * torch_err, 1e-6)


def test_state_dict_keys_are_torch_batchnorm_keys_and_load_both_ways() -> None:
    ours, ref = _make_pair(nn.BatchNorm2d, {}, 6)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = SyncBatchNorm(C).double()
    fresh.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(C).double()
    back.load_state_dict(fresh.state_dict())
    assert all(torch.equal(back.state_dict()[k], ref.state_dict()[k]) for k in ref.state_dict())


def test_one_value_per_channel_raises_torch_error() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        SyncBatchNorm(C)(torch.randn(1, C))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        SyncBatchNorm(C)(torch.randn(1, C, 1, 1))
    SyncBatchNorm(C).eval()(torch.randn(1, C))  # eval uses running stats: fine


def test_empty_batch_like_torch() -> None:
    ours, ref = SyncBatchNorm(C), nn.BatchNorm1d(C)
    y = ours(torch.zeros(0, C))
    ref(torch.zeros(0, C))
    assert y.shape == (0, C)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))


@pytest.mark.parametrize(
    ("shape", "match"),
    [((C,), "at least 2 dimensions"), ((4, C + 1, 2), f"expected {C} channels")],
    ids=["rank1", "channels"],
)
def test_bad_input_names_the_problem(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyncBatchNorm(C)(torch.randn(*shape))


# ----------------------------------------------------------------------------- convert


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=None, eps=1e-3)
        self.block = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.shared = self.bn2
        self.custom = _CustomBN(4)


class _CustomBN(nn.BatchNorm2d):
    """A subclass with its own forward: must not be converted."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


def test_convert_keeps_state_mode_and_requires_grad() -> None:
    net = _Net()
    net.bn2.weight.requires_grad_(False)
    net.bn2.running_mean.fill_(0.25)
    net.block[2].eval()
    old_bn2, old_bn1 = net.bn2, net.block[2]
    params_before = {n: p for n, p in net.named_parameters()}
    state_before = {k: v.clone() for k, v in net.state_dict().items()}

    with pytest.warns(RewriteWarning, match=r"converted 2 of 3 .*custom \(_CustomBN"):
        out = convert_sync_batchnorm(net)

    assert out is net
    assert type(net.bn2) is SyncBatchNorm and type(net.block[2]) is SyncBatchNorm
    assert net.shared is net.bn2, "a shared layer stays shared"
    assert type(net.custom) is _CustomBN, "subclasses with their own forward stay"
    assert net.bn2.momentum is None and net.bn2.eps == 1e-3
    assert net.bn2.weight is old_bn2.weight and net.bn2.running_mean is old_bn2.running_mean
    assert not net.bn2.weight.requires_grad and net.bn2.bias.requires_grad
    assert net.bn2.training and not net.block[2].training
    assert net.block[2].weight is old_bn1.weight
    assert {n: p for n, p in net.named_parameters()} == params_before
    after = net.state_dict()
    assert list(after) == list(state_before)
    assert all(torch.equal(after[k], state_before[k]) for k in state_before)


def test_convert_root_batchnorm_and_toolkit_modules() -> None:
    from bnlab.nn.frozen import FrozenBatchNorm2d
    from bnlab.nn.ghost import GhostBatchNorm2d
    from bnlab.nn.renorm import BatchRenorm2d

    bn = nn.BatchNorm3d(2, affine=False, track_running_stats=False)
    new = convert_sync_batchnorm(bn)
    assert type(new) is SyncBatchNorm and new.weight is None and new.running_mean is None
    toolkit = nn.Sequential(BatchRenorm2d(4), GhostBatchNorm2d(4, 2), FrozenBatchNorm2d(4))
    layers = list(toolkit)
    with pytest.warns(RewriteWarning, match="converted 0 of 3 batch-norm layer"):
        assert convert_sync_batchnorm(toolkit) is toolkit
    assert list(toolkit) == layers, "renorm, ghost and frozen layers are left as they are"
    torch_sync = nn.SyncBatchNorm(4)
    assert type(convert_sync_batchnorm(torch_sync)) is SyncBatchNorm


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
