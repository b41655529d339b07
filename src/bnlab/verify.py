"""``bnlab verify``: the NumPy core against ``torch.nn.BatchNorm*``, case by case.

Every case builds our layer and torch's with the same weights, runs a few training steps
and then one eval step on the same random inputs, and compares the output, every gradient
(dx, dweight, dbias) and every buffer (running_mean, running_var, num_batches_tracked).

Tolerances (errors are max |Δ| divided by the largest |value| of the reference):

- float64: ours against torch float64, at most 1e-10.
- float32/float16: ours and torch's own result against torch in float64 on the same
  (rounded) inputs; ours may be at most 4× torch's error, with a floor of one unit in the
  last place (a quantity torch gets exactly right may still be 1 ulp off in ours).
- ``num_batches_tracked`` must be equal.

The same harness (:func:`run_case`) is what the test suite uses.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import bnlab.core as core

FLOAT64_TOL = 1e-10
FLOAT32_FACTOR = 4.0
GRADCHECK_TOL = 1e-6

_EPS = {"float16": float(np.finfo(np.float16).eps), "float32": float(np.finfo(np.float32).eps)}


@dataclass(frozen=True)
class Case:
    """One comparison: a class, its constructor kwargs, the input shape and dtype."""

    cls: str  # "BatchNorm1d" / "BatchNorm2d" / "BatchNorm3d"
    shape: tuple[int, ...]
    dtype: str = "float64"  # "float16" (input only; layer float32), "float32", "float64"
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 3  # training steps before the eval step
    offset: float = 0.5  # input mean
    spread: float = 2.0  # input standard deviation

    @property
    def id(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        shape = "x".join(map(str, self.shape))
        extra = f",x~{self.offset:g}±{self.spread:g}" if (self.offset, self.spread) != (
            0.5, 2.0) else ""
        return f"{self.cls}[{shape}] {self.dtype} {flags}{extra}"


@dataclass
class CaseResult:
    case: Case
    errors: dict[str, float]  # ours, per quantity group: forward/backward/running
    limits: dict[str, float]  # the largest error allowed, per group
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def default_cases() -> list[Case]:
    """Every class × affine × track_running_stats × momentum × dtype, plus numerics cases."""
    shapes = [
        ("BatchNorm1d", (8, 4)),
        ("BatchNorm1d", (5, 4, 3)),
        ("BatchNorm2d", (4, 3, 3, 2)),
        ("BatchNorm3d", (3, 2, 2, 3, 2)),
    ]
    cases = []
    for (cls, shape), affine, track, momentum, dtype in itertools.product(
        shapes, (True, False), (True, False), (0.1, None, 1.0, 0.0), ("float32", "float64")
    ):
        kwargs = {"affine": affine, "track_running_stats": track, "momentum": momentum}
        cases.append(Case(cls, shape, dtype, kwargs))
    # Large offset against a small spread: where E[x²] − E[x]² would lose every digit.
    cases.append(Case("BatchNorm2d", (16, 4, 8, 8), "float32", {}, 2, 1e4, 1e-2))
    cases.append(Case("BatchNorm1d", (256, 8), "float32", {}, 2, -3e3, 1e-3))
    cases.append(Case("BatchNorm2d", (8, 4, 6, 6), "float16", {}, 2))
    return cases


def _torch_class(name: str) -> Any:
    import torch

    return getattr(torch.nn, name)


def _rel(a: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a64.shape != r64.shape:
        return float("inf")
    both_nan = np.isnan(a64) & np.isnan(r64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - r64))
    finite = np.abs(r64[np.isfinite(r64)])
    scale = float(finite.max()) if finite.size else 1.0
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)) / max(scale, floor, 1e-300)


def run_case(case: Case, seed: int = 0) -> CaseResult:
    """Run ``case`` on our layer, torch's in the same dtype and torch's in float64."""
    import torch

    rng = np.random.default_rng(seed)
    c = case.shape[1]
    in_dt = np.dtype(case.dtype)
    layer_dt = np.float32 if in_dt == np.float16 else in_dt
    ours = getattr(core, case.cls)(c, dtype=layer_dt, **case.kwargs)
    if ours.affine:
        ours.weight[...] = rng.uniform(0.5, 1.5, c)
        ours.bias[...] = rng.normal(0.0, 0.5, c)
    tdt = {np.float16: torch.float32, np.float32: torch.float32, np.float64: torch.float64}
    theirs = _torch_class(case.cls)(c, **case.kwargs).to(tdt[np.dtype(layer_dt).type])
    ref = _torch_class(case.cls)(c, **case.kwargs).to(torch.float64)
    state = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)
    ref.load_state_dict(state)

    exact = in_dt == np.float64  # float64: torch itself is the reference
    errors: dict[str, float] = {"forward": 0.0, "backward": 0.0, "running": 0.0}
    torch_errors: dict[str, float] = dict(errors)
    failures: list[str] = []
    per_quantity: dict[str, tuple[str, float, float]] = {}  # name -> (group, ours, torch)

    def compare(group: str, name: str, mine: Any, tv: Any, rv: Any, floor: float = 0.0) -> None:
        t = tv.detach().double().numpy() if tv is not None else None
        r = rv.detach().double().numpy() if rv is not None else None
        if mine is None or t is None or r is None:
            if not (mine is None and t is None):
                failures.append(f"{name}: ours {mine is None}, torch {t is None} (None)")
            return
        mine_err = _rel(mine, t if exact else r, floor)
        errors[group] = max(errors[group], mine_err)
        if not exact:
            torch_err = _rel(t, r, floor)
            torch_errors[group] = max(torch_errors[group], torch_err)
            # Each quantity is held to 4x torch's own error on that same quantity.
            _, prev_mine, prev_torch = per_quantity.get(name, (group, 0.0, 0.0))
            per_quantity[name] = (group, max(prev_mine, mine_err), max(prev_torch, torch_err))

    x_scale = 0.0
    for step in range(case.steps + 1):
        if step == case.steps:
            ours.eval()
            theirs.eval()
            ref.eval()
        x = rng.normal(case.offset, case.spread, case.shape).astype(in_dt)
        dy = rng.normal(0.0, 1.0, case.shape).astype(in_dt)
        tx = torch.from_numpy(x).requires_grad_(True)
        rx = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        y = ours(x)
        dx = ours.backward(dy)
        ty = theirs(tx)
        ty.backward(torch.from_numpy(dy))
        ry = ref(rx)
        ry.backward(torch.from_numpy(dy.astype(np.float64)))
        compare("forward", "y", y, ty, ry)
        # dx = gain·(dy − …) can cancel to ~0 (e.g. two samples per channel): measure its
        # error against the size of its first term, max|dy|·max|weight|/sqrt(min var + eps).
        x64 = x.astype(np.float64)
        batch_var = x64.reshape(x.shape[0], c, -1).transpose(1, 0, 2).reshape(c, -1).var(1)
        w_max = float(np.abs(ours.weight).max()) if ours.affine else 1.0
        eps = float(case.kwargs.get("eps", 1e-5))
        dx_floor = float(np.abs(dy).max()) * w_max / np.sqrt(batch_var.min() + eps)
        compare("backward", "dx", dx, tx.grad, rx.grad, dx_floor)
        if ours.affine:
            # dweight = Σ dy·xhat and dbias = Σ dy can cancel to ~0: measure their errors
            # against the sums of the magnitudes, Σ|dy·xhat| and Σ|dy| (the condition).
            bshape = (1, c) + (1,) * (len(case.shape) - 2)
            w64 = ref.weight.detach().numpy().reshape(bshape)
            b64 = ref.bias.detach().numpy().reshape(bshape)
            xhat64 = (ry.detach().numpy() - b64) / w64
            axes = (0, *range(2, len(case.shape)))
            dy64 = np.abs(dy.astype(np.float64))
            floors = {"weight": float((dy64 * np.abs(xhat64)).sum(axes).max()),
                      "bias": float(dy64.sum(axes).max())}
            for p in ("weight", "bias"):
                compare("backward", f"d{p}", ours.grads.get(p), getattr(theirs, p).grad,
                        getattr(ref, p).grad, floors[p])
                getattr(theirs, p).grad = None
                getattr(ref, p).grad = None
        # A mean is only as exact as the values it averages: measure running_mean's error
        # against the size of the inputs too (it can sit near 0 while they do not).
        x_scale = max(x_scale, float(np.abs(x64).max()))
        compare("running", "running_mean", ours.running_mean, theirs.running_mean,
                ref.running_mean, x_scale)
        compare("running", "running_var", ours.running_var, theirs.running_var, ref.running_var)
        nbt = None if theirs.num_batches_tracked is None else int(theirs.num_batches_tracked)
        if ours.num_batches_tracked != nbt:
            failures.append(f"num_batches_tracked {ours.num_batches_tracked} != torch {nbt}")
        if y.dtype != x.dtype or dx.dtype != x.dtype:
            failures.append(f"dtype: y {y.dtype}, dx {dx.dtype}, expected {x.dtype}")

    def float32_limit(group: str, torch_err: float) -> float:
        floor = _EPS[case.dtype] if group == "forward" else _EPS[np.dtype(layer_dt).name]
        return FLOAT32_FACTOR * max(torch_err, floor)

    # float64 is held to a fixed tolerance per group; float32/16 per quantity (below), which
    # implies its group's limit, so the group limits are only shown in the table.
    limits = {}
    for group, err in errors.items():
        limit = FLOAT64_TOL if exact else float32_limit(group, torch_errors[group])
        limits[group] = limit
        if exact and not err <= limit:
            failures.append(f"{group} {err:.1e} > {limit:.1e}")
    for name, (group, err, torch_err) in per_quantity.items():
        limit = float32_limit(group, torch_err)
        if not err <= limit:
            failures.append(f"{name} {err:.1e} > {limit:.1e} (4x torch's own {torch_err:.1e})")
    return CaseResult(case, errors, limits, failures)


def gradcheck(cls: str, shape: tuple[int, ...], *, affine: bool, training: bool,
              seed: int = 0, h: float = 1e-6) -> float:
    """Largest relative error of dx, dweight, dbias against central differences (float64).

    The loss is ``Σ y · r`` for a fixed random ``r``; statistics are not tracked, so the
    finite differences do not move any buffer. ``training=False`` uses fixed running
    statistics (set on a tracking layer, whose eval forward changes nothing).
    """
    rng = np.random.default_rng(seed)
    c = shape[1]
    layer = getattr(core, cls)(c, dtype=np.float64, affine=affine,
                               track_running_stats=not training)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 1.5, c)
        layer.bias[...] = rng.normal(0, 0.5, c)
    if not training:
        layer.running_mean[...] = rng.normal(0, 1, c)
        layer.running_var[...] = rng.uniform(0.5, 2.0, c)
        layer.eval()
    x = rng.normal(0.3, 1.5, shape)
    r = rng.normal(0, 1, shape)

    def loss() -> float:
        return float((layer(x) * r).sum())

    loss()
    analytic = {"x": layer.backward(r), **layer.grads}
    worst = 0.0
    for name, arr in [("x", x), *layer.params().items()]:
        numeric = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            keep = arr[i]
            try:
                arr[i] = keep + h
                up = loss()
                arr[i] = keep - h
                down = loss()
            finally:
                arr[i] = keep
            numeric[i] = (up - down) / (2 * h)
        scale = max(float(np.abs(numeric).max()), 1.0)
        worst = max(worst, float(np.abs(analytic[name] - numeric).max()) / scale)
    return worst


def gradcheck_cases() -> list[tuple[str, tuple[int, ...], bool, bool]]:
    shapes = {"BatchNorm1d": (6, 3), "BatchNorm2d": (3, 2, 3, 2), "BatchNorm3d": (2, 2, 2, 2, 2)}
    return [
        (cls, shape, affine, training)
        for cls, shape in shapes.items()
        for affine in (True, False)
        for training in (True, False)
    ]


def _fmt(v: float) -> str:
    return f"{v:.1e}"


def _print_table(rows: Iterable[list[str]], header: list[str], out: Callable[[str], None]) -> None:
    rows = list(rows)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out(line)
    out("-" * len(line))
    for r in rows:
        out("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def run_verify(seed: int = 0, out: Callable[[str], None] = print) -> int:
    """Run every case and the gradient checks, print the tables; 0 if all agree, else 1."""
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads(), core.get_num_threads()
    # Tiny tensors: threads only add overhead (and fight over a shared machine's cores).
    torch.set_num_threads(1)
    core.set_num_threads(1)
    try:
        return _verify(seed, out, start)
    finally:
        torch.set_num_threads(threads[0])
        core.set_num_threads(threads[1])


def _verify(seed: int, out: Callable[[str], None], start: float) -> int:
    results = [run_case(case, seed) for case in default_cases()]
    rows = [
        [r.case.id, _fmt(r.errors["forward"]), _fmt(r.errors["backward"]),
         _fmt(r.errors["running"]),
         f"{max(r.errors[g] / r.limits[g] for g in r.errors):.2f}",
         "ok" if r.ok else "MISMATCH: " + "; ".join(r.failures)]
        for r in results
    ]
    out("bnlab.core vs torch.nn.BatchNorm*: max |Δ| / max |reference| over 3 training steps "
        "and 1 eval step")
    out(f"(float64: vs torch float64, limit {FLOAT64_TOL:g}; float32/16: vs torch float64 "
        f"on the same inputs, limit {FLOAT32_FACTOR:g}x torch's own error; worst/limit <= 1 "
        "passes)")
    _print_table(rows, ["case", "forward", "backward", "running", "worst/limit", "verdict"], out)
    grad_rows = []
    grad_ok = True
    for cls, shape, affine, training in gradcheck_cases():
        err = gradcheck(cls, shape, affine=affine, training=training, seed=seed)
        ok = err <= GRADCHECK_TOL
        grad_ok &= ok
        grad_rows.append([f"{cls}[{'x'.join(map(str, shape))}] affine={affine} "
                          f"{'train' if training else 'eval'}", _fmt(err),
                          "ok" if ok else "MISMATCH"])
    out("")
    out(f"finite-difference gradient check (float64, central differences; limit "
        f"{GRADCHECK_TOL:g})")
    _print_table(grad_rows, ["case", "max rel error", "verdict"], out)
    bad = sum(not r.ok for r in results) + sum(row[-1] != "ok" for row in grad_rows)
    total = len(results) + len(grad_rows)
    out("")
    out(f"{total - bad}/{total} checks passed in {time.perf_counter() - start:.1f} s")
    return 0 if bad == 0 else 1
