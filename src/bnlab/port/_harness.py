"""The conformance harness: one BN layer on both sides of a conversion, the same inputs.

For a pair (source → target) a source layer is built with random state in its own
framework, converted three ways and compared on identical inputs:

* ``bnlab``: :mod:`bnlab.port`'s conversion;
* ``naive``: momentum, eps and variance copied as the numbers they are (what a hand
  port of the weights and hyperparameters does), into the target's own layer;
* ``defaults``: only the arrays copied, the target's default momentum and eps.

Measured: the eval output (relative max error), then ``steps`` training steps on both
sides with the same batches and the running mean and variance compared. Every side works
on arrays in PyTorch's layout (N, C, ...); Keras and Flax get channels last.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bnlab.port import _flax, _keras, _onnx, _torch
from bnlab.port._deps import require
from bnlab.port._state import BNState, PortWarning

LABELS = {"torch": "PyTorch", "keras": "Keras 3", "flax": "Flax linen", "onnx": "ONNX Runtime"}
PAIRS = (("torch", "keras"), ("keras", "torch"), ("torch", "flax"), ("flax", "torch"),
         ("torch", "onnx"), ("onnx", "torch"))
CONVERSIONS = ("bnlab", "naive", "defaults")
DEFAULTS = {"torch": (0.1, 1e-5), "keras": (0.01, 1e-3), "flax": (0.01, 1e-5),
            "onnx": (0.1, 1e-5)}  # (torch-convention momentum, eps) of each default layer


def rel_err(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """max |a − b| / max |b| (0 for two empty sides)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b64))) or 1.0
    return float(np.max(np.abs(a64 - b64))) / scale


def _last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def _first(x: Any) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 1)


# --------------------------------------------------------------------------- sides


class Side:
    """A BN layer in one framework, driven with arrays in torch's layout."""

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> BNState:
        raise NotImplementedError


class TorchSide(Side):
    def __init__(self, module: Any) -> None:
        self.module = module

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        import torch

        self.module.train(training)
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy()

    def state(self) -> BNState:
        return _torch.from_torch(self.module)


class KerasSide(Side):
    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        keras = require("keras")
        y = self.layer(_last(x), training=training)
        return _first(keras.ops.convert_to_numpy(y))

    def state(self) -> BNState:
        return _keras.from_keras(self.layer)


class FlaxSide(Side):
    def __init__(self, module: Any, variables: Any) -> None:
        self.module, self.variables = module, variables

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        kwargs = {} if self.module.use_running_average is not None else {
            "use_running_average": not training}
        y, upd = self.module.apply(self.variables, _last(x), mutable=["batch_stats"], **kwargs)
        if training:
            self.variables = {**self.variables, "batch_stats": upd["batch_stats"]}
        return _first(y)

    def state(self) -> BNState:
        return _flax.from_flax(self.module, self.variables)


class OnnxSide(Side):
    """An ONNX BN node run by ONNX Runtime; training feeds the statistics back as inputs."""

    def __init__(self, state: BNState, rank: int) -> None:
        self._state, self.rank = state, rank
        self._eval = _onnx.session(_onnx.to_onnx(state, rank, training=False))
        helper = require("onnx.helper")
        if state.tracks_stats:
            model = _onnx.to_onnx(state, rank, training=True)
            elem = model.graph.input[0].type.tensor_type.elem_type
            for nm in ("bn.running_mean", "bn.running_var"):
                model.graph.input.append(helper.make_tensor_value_info(
                    nm, elem, [state.num_features]))
            self._train = _onnx.session(model)
        self.mean, self.var = state.mean, state.var

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if training and self._state.tracks_stats:
            y, self.mean, self.var = self._train.run(
                None, {"X": x, "bn.running_mean": self.mean, "bn.running_var": self.var})
            return np.asarray(y)
        if self._state.tracks_stats and (self.mean is not self._state.mean):
            self._state = replace(self._state, mean=self.mean, var=self.var)
            self._eval = _onnx.session(_onnx.to_onnx(self._state, self.rank))
        return np.asarray(self._eval.run(None, {"X": x})[0])

    def state(self) -> BNState:
        return replace(self._state, mean=self.mean, var=self.var)


# --------------------------------------------------------------------------- building


def native_source(fw: str, truth: BNState, rank: int) -> Side:
    """A layer of framework ``fw`` holding ``truth``, made with that framework's own API."""
    dt = np.dtype(truth.dtype)
    m = truth.momentum if truth.momentum is not None else 0.1
    if fw == "torch":
        import torch

        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[rank]
        tdt = {np.float32: torch.float32, np.float64: torch.float64}[dt.type]
        mod = cls(truth.num_features, eps=truth.eps, momentum=truth.momentum,
                  affine=truth.affine, track_running_stats=truth.tracks_stats, dtype=tdt)
        with torch.no_grad():
            for attr, arr in (("weight", truth.weight), ("bias", truth.bias),
                              ("running_mean", truth.mean), ("running_var", truth.var)):
                if arr is not None:
                    getattr(mod, attr).copy_(torch.from_numpy(arr))
        return TorchSide(mod)
    if fw == "keras":
        keras = require("keras")
        layer = keras.layers.BatchNormalization(
            momentum=1 - m, epsilon=truth.eps, center=truth.bias is not None,
            scale=truth.weight is not None, dtype=dt.name)
        layer.build((None, *([None] * (rank - 2)), truth.num_features))
        for var, arr in ((layer.gamma, truth.weight), (layer.beta, truth.bias),
                         (layer.moving_mean, truth.mean), (layer.moving_variance, truth.var)):
            if arr is not None and var is not None:
                var.assign(arr)
        return KerasSide(layer)
    if fw == "flax":
        linen = require("flax.linen")
        jnp = require("jax.numpy")
        module = linen.BatchNorm(momentum=1 - m, epsilon=truth.eps,
                                 use_scale=truth.weight is not None,
                                 use_bias=truth.bias is not None, param_dtype=dt)
        params = {k: jnp.asarray(v) for k, v in (("scale", truth.weight), ("bias", truth.bias))
                  if v is not None}
        variables: dict[str, Any] = {"batch_stats": {"mean": jnp.asarray(truth.mean),
                                                     "var": jnp.asarray(truth.var)}}
        if params:
            variables["params"] = params
        return FlaxSide(module, variables)
    return OnnxSide(replace(truth, variance_update="biased"), rank)


def convert(src: Side, dst_fw: str, conversion: str, rank: int) -> Side:
    """The target side for ``conversion`` of ``src``'s state."""
    state = src.state()
    stock = conversion != "bnlab"
    if conversion == "naive":
        raw = 1 - state.momentum if state.momentum is not None else None
        state = replace(state, momentum=raw)
    elif conversion == "defaults":
        m, eps = DEFAULTS[dst_fw]
        state = replace(state, momentum=m, eps=eps)
    ctx = warnings.catch_warnings()
    with ctx:
        if stock:
            warnings.simplefilter("ignore", PortWarning)
        rule = "target" if stock else "source"
        if dst_fw == "torch":
            return TorchSide(_torch.to_torch(state, _dim(rank), update_rule=rule))
        if dst_fw == "keras":
            return KerasSide(_keras.to_keras(state, axis=-1, rank=rank, update_rule=rule))
        if dst_fw == "flax":
            return FlaxSide(*_flax.to_flax(state, axis=-1, update_rule=rule))
        return OnnxSide(state, rank)


def _dim(rank: int) -> int:
    return {2: 1, 3: 1, 4: 2, 5: 3}[rank]


def random_truth(c: int, dtype: Any, *, momentum: float | None, eps: float, affine: bool,
                 rng: np.random.Generator, tracks: bool = True) -> BNState:
    dt = np.dtype(dtype)
    return BNState(
        weight=rng.uniform(0.5, 1.5, c).astype(dt) if affine else None,
        bias=rng.normal(0, 0.5, c).astype(dt) if affine else None,
        mean=rng.normal(0, 1, c).astype(dt) if tracks else None,
        var=rng.uniform(0.5, 2.0, c).astype(dt) if tracks else None,
        eps=eps, momentum=momentum,
    )


def batches(shape: tuple[int, ...], dtype: Any, steps: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    c = shape[1]
    loc = rng.normal(1.0, 1.0, c).reshape(1, c, *([1] * (len(shape) - 2)))
    sd = rng.uniform(0.5, 3.0, c).reshape(loc.shape)
    return [(loc + sd * rng.standard_normal(shape)).astype(dtype) for _ in range(steps)]


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Case:
    src: str
    dst: str
    dtype: str = "float32"
    shape: tuple[int, ...] = (16, 3, 4, 4)
    momentum: float | None = 0.1
    eps: float = 1e-5
    affine: bool = True
    steps: int = 100
    seed: int = 0


@dataclass(frozen=True)
class Result:
    case: Case
    conversion: str
    eval_err: float
    mean_err: float
    var_err: float
    train_out_err: float


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    """JAX's 64-bit mode for the duration of a float64 case (restored after)."""
    if dtype != "float64":
        yield
        return
    jax = require("jax")
    with jax.enable_x64(True):
        yield


def measure(case: Case, conversion: str) -> Result:
    rng = np.random.default_rng(case.seed)
    rank = len(case.shape)
    with precision(case.dtype):
        truth = random_truth(case.shape[1], case.dtype, momentum=case.momentum, eps=case.eps,
                             affine=case.affine, rng=rng)
        src = native_source(case.src, truth, rank)
        dst = convert(src, case.dst, conversion, rank)
        xs = batches(case.shape, case.dtype, case.steps + 1, rng)
        eval_err = rel_err(dst.forward(xs[0], False), src.forward(xs[0], False))
        out_err = 0.0
        for x in xs[1:]:
            out_err = max(out_err, rel_err(dst.forward(x, True), src.forward(x, True)))
        a, b = dst.state(), src.state()
    return Result(case, conversion, eval_err, rel_err(a.mean, b.mean), rel_err(a.var, b.var),
                  out_err)


def check_table(dtypes: tuple[str, ...] = ("float32", "float64"), steps: int = 100,
                momenta: tuple[float, ...] = (0.1, 0.01), epsilons: tuple[float, ...] = (1e-5,
                1e-3), pairs: tuple[tuple[str, str], ...] = PAIRS,
                progress: Any = None) -> list[Result]:
    """Every pair x dtype x momentum x eps x conversion (the ``bnlab port check`` table)."""
    out = []
    for src, dst in pairs:
        for dtype in dtypes:
            for m in momenta:
                for eps in epsilons:
                    case = Case(src, dst, dtype=dtype, momentum=m, eps=eps, steps=steps)
                    for conv in CONVERSIONS:
                        out.append(measure(case, conv))
                    if progress is not None:
                        progress()
    return out


def format_results(results: list[Result]) -> str:
    """A Markdown table: one row per case, the three conversions' errors side by side."""
    rows: dict[Case, dict[str, Result]] = {}
    for r in results:
        rows.setdefault(r.case, {})[r.conversion] = r
    head = ("| pair | dtype | momentum | eps | eval: bnlab / naive / defaults "
            "| running mean after N steps | running var after N steps |")
    lines = [head, "|" + "---|" * 7]
    for case, by in rows.items():
        def three(attr: str, by: dict[str, Result] = by) -> str:
            return " / ".join(_fmt(getattr(by[c], attr)) for c in CONVERSIONS if c in by)

        lines.append(
            f"| {LABELS[case.src]} → {LABELS[case.dst]} | {case.dtype} | {case.momentum:g} | "
            f"{case.eps:g} | {three('eval_err')} | {three('mean_err')} | {three('var_err')} |"
        )
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"
