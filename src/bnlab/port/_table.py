"""The framework behaviour table: what each framework's BN does, measured by running it.

Every cell comes from running the installed framework on fixed inputs (defaults are read
from a default-constructed layer or the operator schema), rounded so that a rerun on the
same versions prints the same table. ``bnlab port table`` prints or writes it.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

from bnlab.port._deps import require

COLUMNS = ("PyTorch nn.BatchNorm1d/2d/3d", "Keras 3 BatchNormalization", "Flax linen.BatchNorm",
           "Flax nnx.BatchNorm", "ONNX Runtime BatchNormalization")
PACKAGES = ("torch", "keras", "jax", "flax", "onnx", "onnxruntime", "numpy")

_RNG_SEED = 0
N, C = 8, 3


def _batch(dtype: Any = np.float32) -> np.ndarray:
    """(N, C) with per-channel means 2, -1, 0.5 and standard deviations 3, 1, 0.5."""
    rng = np.random.default_rng(_RNG_SEED)
    return (np.array([2.0, -1.0, 0.5]) + np.array([3.0, 1.0, 0.5]) *
            rng.standard_normal((N, C))).astype(dtype)


def _g(v: float) -> str:
    return f"{v:.4g}"


# --------------------------------------------------------------------------- drivers
# Each driver: make(momentum_as_written | None, eps | None, **flags) -> layer,
# step(layer, x (N, C)) -> output in training, evaluate(layer, x) -> output in eval,
# stats(layer) -> (running mean, running var), defaults() -> (momentum, eps).


class _Torch:
    name = COLUMNS[0]

    def defaults(self) -> tuple[float, float]:
        import torch

        bn = torch.nn.BatchNorm1d(C)
        return float(bn.momentum), float(bn.eps)  # type: ignore[arg-type]

    def make(self, momentum: float | None = None, track: bool = True) -> Any:
        import torch

        kw: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        return torch.nn.BatchNorm1d(C, track_running_stats=track, **kw)

    def step(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import torch

        layer.train()
        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    def evaluate(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import torch

        layer.eval()
        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    def stats(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        return layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()


class _Keras:
    name = COLUMNS[1]

    def defaults(self) -> tuple[float, float]:
        keras = require("keras")
        layer = keras.layers.BatchNormalization()
        return float(layer.momentum), float(layer.epsilon)

    def make(self, momentum: float | None = None, track: bool = True) -> Any:
        keras = require("keras")
        kw: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        layer = keras.layers.BatchNormalization(**kw)
        layer.build((None, C))
        return layer

    def step(self, layer: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(layer(x, training=True))

    def evaluate(self, layer: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(layer(x, training=False))

    def stats(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(layer.moving_mean.value), np.asarray(layer.moving_variance.value)


class _Linen:
    name = COLUMNS[2]

    def defaults(self) -> tuple[float, float]:
        linen = require("flax.linen")
        bn = linen.BatchNorm()
        return float(bn.momentum), float(bn.epsilon)

    def make(self, momentum: float | None = None, track: bool = True) -> Any:
        linen = require("flax.linen")
        jax = require("jax")
        kw: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        module = linen.BatchNorm(**kw)
        return [module, module.init(jax.random.PRNGKey(0), np.zeros((2, C), np.float32),
                                    use_running_average=True)]

    def step(self, layer: Any, x: np.ndarray) -> np.ndarray:
        y, upd = layer[0].apply(layer[1], x, use_running_average=False,
                                mutable=["batch_stats"])
        layer[1] = {**layer[1], "batch_stats": upd["batch_stats"]}
        return np.asarray(y)

    def evaluate(self, layer: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(layer[0].apply(layer[1], x, use_running_average=True))

    def stats(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        s = layer[1]["batch_stats"]
        return np.asarray(s["mean"]), np.asarray(s["var"])


class _Nnx:
    name = COLUMNS[3]

    def defaults(self) -> tuple[float, float]:
        bn = self.make()
        return float(bn.momentum), float(bn.epsilon)

    def make(self, momentum: float | None = None, track: bool = True) -> Any:
        nnx = require("flax.nnx")
        kw: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        return nnx.BatchNorm(C, rngs=nnx.Rngs(0), **kw)

    def step(self, layer: Any, x: np.ndarray) -> np.ndarray:
        layer.use_running_average = False
        return np.asarray(layer(x))

    def evaluate(self, layer: Any, x: np.ndarray) -> np.ndarray:
        layer.use_running_average = True
        return np.asarray(layer(x))

    def stats(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        from bnlab.port._flax import _get

        return _get(layer.mean), _get(layer.var)


class _Onnx:
    name = COLUMNS[4]

    def _schema_default(self, attr: str) -> float:
        onnx = require("onnx")
        schema = onnx.defs.get_schema("BatchNormalization", 15)
        return float(onnx.helper.get_attribute_value(schema.attributes[attr].default_value))

    def defaults(self) -> tuple[float, float]:
        return self._schema_default("momentum"), self._schema_default("epsilon")

    def make(self, momentum: float | None = None, track: bool = True) -> Any:
        m = self._schema_default("momentum") if momentum is None else momentum
        return {"momentum": m, "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}

    def _graph(self, layer: Any, training: bool, dtype: Any) -> Any:
        from bnlab.port._onnx import session

        onnx = require("onnx")
        h = onnx.helper
        elem = {np.dtype(np.float16): 10, np.dtype(np.float32): 1,
                np.dtype(np.float64): 11}[np.dtype(dtype)]
        outs = ["Y", "rm", "rv"] if training else ["Y"]
        node = h.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], outs,
                           momentum=float(layer["momentum"]), training_mode=int(training))
        ins = [h.make_tensor_value_info("X", elem, ["N", C])]
        ins += [h.make_tensor_value_info(n, elem, [C]) for n in "sbmv"]
        graph = h.make_graph([node], "bn", ins,
                             [h.make_tensor_value_info(o, elem, None if o == "Y" else [C])
                              for o in outs])
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 15)])
        model.ir_version = 10
        return session(model)

    def _feeds(self, layer: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        dt = x.dtype
        return {"X": x, "s": np.ones(C, dt), "b": np.zeros(C, dt),
                "m": layer["mean"].astype(dt), "v": layer["var"].astype(dt)}

    def step(self, layer: Any, x: np.ndarray) -> np.ndarray:
        y, layer["mean"], layer["var"] = self._graph(layer, True, x.dtype).run(
            None, self._feeds(layer, x))
        return np.asarray(y)

    def evaluate(self, layer: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._graph(layer, False, x.dtype).run(None, self._feeds(layer, x))[0])

    def stats(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(layer["mean"]), np.asarray(layer["var"])


DRIVERS = (_Torch(), _Keras(), _Linen(), _Nnx(), _Onnx())


# --------------------------------------------------------------------------- the rows


def _try(fn: Callable[[], str]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except Exception as exc:  # a framework's refusal is a measured behaviour
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"raises {type(exc).__name__}" + (f": {first[:70]}" if first else "")


_WEIGHTS: dict[str, float] = {}


def _batch_weight(d: Any) -> float:
    """The new batch's weight w in running_mean ← (1 − w)·old + w·batch, default momentum."""
    if d.name not in _WEIGHTS:
        _WEIGHTS[d.name] = _measure_weight(d)
    return _WEIGHTS[d.name]


def _measure_weight(d: Any) -> float:
    x = _batch()
    layer = d.make()
    d.step(layer, x)
    return float(d.stats(layer)[0][0] / x[:, 0].mean(dtype=np.float64))


def _direction(d: Any) -> str:
    m, _ = d.defaults()
    w = _batch_weight(d)
    if abs(w - m) < 1e-4:
        return f"batch gets m ({_g(w)})"
    if abs(w - (1 - m)) < 1e-4:
        return f"old keeps m: batch gets 1 − m ({_g(w)})"
    return f"batch weight {_g(w)} (neither m nor 1 − m)"


def _torch_equivalent(d: Any) -> str:
    return _g(_batch_weight(d))


def _variance(d: Any) -> str:
    x = _batch()
    full = {"PyTorch": 1.0}.get(d.name.split()[0], 0.0)  # all weight on the batch
    layer = d.make(momentum=full)
    d.step(layer, x)
    got = float(d.stats(layer)[1][0])
    biased, unbiased = float(x[:, 0].var(dtype=np.float64)), float(x[:, 0].var(ddof=1,
                                                                           dtype=np.float64))
    if abs(got - unbiased) < 1e-5 * unbiased:
        return "unbiased (batch var × n/(n−1))"
    if abs(got - biased) < 1e-5 * biased:
        return "biased (batch var)"
    return f"neither ({_g(got)} vs {_g(biased)} / {_g(unbiased)})"


def _first_step(d: Any) -> str:
    m0, v0 = d.stats(d.make())
    return (f"EMA from the initial mean {_g(float(m0[0]))}, var {_g(float(v0[0]))}: mean ← "
            f"{_torch_equivalent(d)}·batch mean (no bias correction)")


def _batch_of_one(d: Any) -> str:
    def run() -> str:
        x = _batch()[:1]
        layer = d.make()
        y = d.step(layer, x)
        var = d.stats(layer)[1]
        return (f"output {_g(float(np.abs(y).max()))} (all offset: var 0); running var "
                f"{_g(float(var[0]))}" if np.isfinite(y).all() else "output NaN")

    return _try(run)


def _eval_without_stats(d: Any) -> str:
    x = _batch()
    if d.name.startswith("PyTorch"):
        y = d.evaluate(d.make(track=False), x)
        if np.abs(y.mean(0)).max() < 1e-5:
            return "track_running_stats=False: batch statistics"
        return f"track_running_stats=False: output mean {_g(float(np.abs(y.mean(0)).max()))}"
    if d.name.startswith("ONNX"):
        return "eval node needs mean and var inputs; training_mode=1: batch statistics"
    layer = d.make()
    y = d.evaluate(layer, x)
    _, eps = d.defaults()
    if np.allclose(y, x / np.sqrt(1 + eps), rtol=1e-5, atol=1e-6):
        extra = ("; use_running_average=False: batch statistics" if d.name.startswith("Flax")
                 else "; no batch-statistics eval")
        return "fresh layer: x/√(1+ε) (initial 0 and 1)" + extra
    return f"fresh layer: max |y| {_g(float(np.abs(y).max()))}"


def _float16(d: Any) -> str:
    def run() -> str:
        x = (_batch(np.float64) + 1000.0).astype(np.float16)  # large mean, small spread
        layer = d.make(momentum=None)
        y = d.step(layer, x)
        ref = (x.astype(np.float64) - x.astype(np.float64).mean(0)) / np.sqrt(
            x.astype(np.float64).var(0) + d.defaults()[1])
        err = float(np.abs(np.asarray(y, np.float64) - ref).max())
        return f"output {np.asarray(y).dtype}, max error {err:.1g}"

    return _try(run)


def _float64(d: Any) -> str:
    def run() -> str:
        jax = require("jax")
        with jax.enable_x64(True):
            x = _batch(np.float64)
            layer = d.make()
            if d.name.startswith("PyTorch"):
                layer = layer.double()
            elif d.name.startswith("Keras"):
                keras = require("keras")
                layer = keras.layers.BatchNormalization(dtype="float64")
                layer.build((None, C))
            elif d.name.startswith("Flax linen"):
                linen = require("flax.linen")
                module = linen.BatchNorm(param_dtype=np.float64)
                layer = [module, module.init(jax.random.PRNGKey(0), x,
                                             use_running_average=True)]
            elif d.name.startswith("Flax nnx"):
                nnx = require("flax.nnx")
                layer = nnx.BatchNorm(C, rngs=nnx.Rngs(0), param_dtype=np.float64)
            y = np.asarray(d.step(layer, x), np.float64)
        ref = (x - x.mean(0)) / np.sqrt(x.var(0) + d.defaults()[1])
        err = float(np.abs(y - ref).max())
        return f"max error {err:.0e}" + (" (computes in float32)" if err > 1e-12 else "")

    return _try(run)


ROWS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("default momentum m (as written)", lambda d: _g(d.defaults()[0])),
    ("direction (measured)", _direction),
    ("= torch momentum", _torch_equivalent),
    ("default eps", lambda d: _g(d.defaults()[1])),
    ("running variance tracks (measured)", _variance),
    ("first training step", _first_step),
    ("training batch of one (1, C)", _batch_of_one),
    ("eval without statistics", _eval_without_stats),
    ("float16 input, mean 1000 (training)", _float16),
    ("float64 (training output vs exact)", _float64),
)


def versions() -> str:
    keras = require("keras")
    parts = [f"{p} {metadata.version(p)}" for p in PACKAGES]
    return (f"Measured with {', '.join(parts)}; Keras backend {keras.backend.backend()}; "
            f"Python {platform.python_version()}, CPU.")


def behaviour_table() -> str:
    """The Markdown table (a versions line, then the table)."""
    lines = [versions(), "",
             "| | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, fn in ROWS:
        cells = [_try(functools.partial(fn, d)) for d in DRIVERS]
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
