"""ONNX side: the ``BatchNormalization`` operator (opset 15), run with ONNX Runtime.

Inputs ``X, scale, B, input_mean, input_var``; attributes ``epsilon`` (default 1e-5),
``momentum`` (default 0.9: the old value's share, torch's 0.1) and ``training_mode``.
With ``training_mode=1`` the output uses the batch statistics and the optional outputs
``running_mean``/``running_var`` are the updated statistics, the variance tracking the
biased batch variance. ONNX has no affine flag (scale 1 and offset 0 are exact), no counter,
no cumulative average; ``track_running_stats=False`` is a ``training_mode=1`` node whose
statistics outputs are not used. Channels are on axis 1, as in PyTorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnlab.errors import BnlabError
from bnlab.port._deps import require
from bnlab.port._state import (
    BNState,
    check_same_estimator,
    cumulative_message,
    decay,
    momentum_from_decay,
    warn,
)

OPSET = 15
_ELEM = {np.dtype(np.float16): 10, np.dtype(np.float32): 1, np.dtype(np.float64): 11}


def _attrs(node: Any) -> dict[str, Any]:
    helper = require("onnx.helper")
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def bn_nodes(model: Any) -> dict[str, Any]:
    """The model's BatchNormalization nodes by name: the scale initializer's name without a
    trailing ``.weight`` (torch.onnx's naming, so names match the torch module's), else the
    node's name."""
    out: dict[str, Any] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        scale = node.input[1]
        name = scale[: -len(".weight")] if scale.endswith(".weight") else (
            node.name or f"BatchNormalization_{i}")
        if name in out:
            raise BnlabError(f"two BatchNormalization nodes are both named {name!r}")
        out[name] = node
    return out


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _keeps_stats(model: Any, node: Any) -> bool:
    """False for a training-mode node whose statistics outputs nobody uses: it normalises
    with batch statistics and keeps none (torch's track_running_stats=False)."""
    if not _attrs(node).get("training_mode", 0):
        return True
    used = {o.name for o in model.graph.output}
    used.update(i for other in model.graph.node for i in other.input)
    return any(o and o in used for o in node.output[1:])


def _resolve(model: Any, name: str) -> str | None:
    """The initializer an input holds: itself, or reached through Identity nodes (torch.onnx
    deduplicates equal initializers, e.g. a fresh layer's running_var and weight, all ones,
    into one initializer and an Identity)."""
    inits = _initializers(model)
    producers = {o: nd for nd in model.graph.node for o in nd.output}
    for _ in range(len(model.graph.node) + 1):
        if name in inits:
            return name
        p = producers.get(name)
        if p is None or p.op_type != "Identity":
            return None
        name = p.input[0]
    return None


def _unique(model: Any, base: str) -> str:
    taken = {t.name for t in model.graph.initializer}
    taken |= {o for nd in model.graph.node for o in nd.output}
    taken |= {v.name for v in model.graph.input}
    new, i = base, 1
    while new in taken:
        new, i = f"{base}{i}", i + 1
    return new


def _own_input(model: Any, node: Any, k: int, role: str, made: list[str]) -> Any:
    """The initializer feeding ``node.input[k]`` and nothing else, made so if needed.

    Another node sharing the initializer gets a copy under a new name (it keeps the old
    value); an input reached through Identity nodes becomes an initializer of its own (an
    Identity that fed only this node is removed). New names go to ``made``.
    """
    numpy_helper = require("onnx.numpy_helper")
    name = node.input[k]
    inits = _initializers(model)
    others = [o for o in model.graph.node if o is not node and name in o.input]
    in_outputs = any(o.name == name for o in model.graph.output)
    if name in inits and not in_outputs:
        if others:
            keep = _unique(model, f"{name}.shared")
            model.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(inits[name]), keep))
            made.append(keep)
            for o in others:
                for i, inp in enumerate(o.input):
                    if inp == name:
                        o.input[i] = keep
        return inits[name]
    value = numpy_helper.to_array(inits[str(_resolve(model, name))])
    producer = next((o for o in model.graph.node if name in o.output), None)
    if producer is not None and not others and not in_outputs:
        model.graph.node.remove(producer)  # an Identity feeding only this node
        new = name
    else:
        new = _unique(model, f"{name}.{role}")
    model.graph.initializer.append(numpy_helper.from_array(value, new))
    made.append(new)
    node.input[k] = new
    return model.graph.initializer[-1]


def from_onnx(model: Any, node: str | None = None) -> BNState:
    """Read the BatchNormalization node ``node`` (by :func:`bn_nodes`' name; may be omitted
    when there is one) of an ONNX model whose statistics are initializers."""
    numpy_helper = require("onnx.numpy_helper")
    nodes = bn_nodes(model)
    if node is None:
        if len(nodes) != 1:
            raise BnlabError(f"the model has {len(nodes)} BatchNormalization nodes; name one "
                             f"of: {', '.join(nodes) or '(none)'}")
        node = next(iter(nodes))
    if node not in nodes:
        raise BnlabError(f"no BatchNormalization node {node!r}; the model has: "
                         f"{', '.join(nodes) or '(none)'}")
    n = nodes[node]
    inits = _initializers(model)
    sources = [_resolve(model, i) for i in n.input[1:5]]
    missing = [i for i, src in zip(n.input[1:5], sources, strict=True) if src is None]
    if missing:
        raise BnlabError(f"{node}: inputs {missing} are not initializers (computed in the "
                         "graph), so they have no stored value to convert")
    scale, offset, mean, var = (numpy_helper.to_array(inits[str(i)]).copy() for i in sources)
    attrs = _attrs(n)
    tracks = _keeps_stats(model, n)
    return BNState(
        weight=scale, bias=offset,
        mean=mean if tracks else None, var=var if tracks else None,
        eps=float(attrs.get("epsilon", 1e-5)),
        momentum=momentum_from_decay(attrs.get("momentum", 0.9)),
        # An eval node never updates its statistics: it has no training rule to keep.
        variance_update="biased" if attrs.get("training_mode", 0) else None,
        source="ONNX BatchNormalization",
    )


def _f32(v: float) -> float:
    return float(np.float32(v))


def stored_stats(state: BNState, eval_node: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, var, eps) to store: ONNX attributes are float32, so in an eval node a float64
    state's variance absorbs eps − float32(eps), keeping var + eps (all eval uses) exact."""
    c, dt = state.num_features, np.dtype(state.dtype)
    mean = state.mean if state.mean is not None else np.zeros(c, dt)
    var = state.var if state.var is not None else np.ones(c, dt)
    eps32 = _f32(state.eps)
    if dt == np.float64 and eps32 != state.eps:
        if eval_node:
            var = np.asarray(var, dt) + (state.eps - eps32)
        else:
            warn(f"ONNX stores epsilon as float32: eps={state.eps!r} becomes {eps32!r} "
                 f"(relative change {abs(eps32 - state.eps) / state.eps:.1e}) where the batch "
                 "variance is normalised; output error up to |Δeps|/(2·(var + eps)) relative")
    return np.asarray(mean, dt), np.asarray(var, dt), eps32


def _eval_momentum(state: BNState) -> float:
    """The momentum attribute of an eval node (unused by ONNX there; kept for a later
    training graph): a cumulative average is stored as its next step's factor."""
    if state.momentum is None:
        return decay(1.0 / ((state.num_batches_tracked or 0) + 1))
    return decay(state.momentum)


def _onnx_momentum(state: BNState) -> float:
    if state.momentum is None:
        m, msg = cumulative_message(state, "ONNX")
        warn(msg)
        return decay(m)
    d = decay(state.momentum)
    if np.dtype(state.dtype) == np.float64 and state.tracks_stats and _f32(d) != d:
        warn(f"ONNX stores momentum as float32: {d!r} becomes {_f32(d)!r}; in training "
             f"graphs each step's update weights differ by {abs(_f32(d) - d):.1e}")
    return d


def load_onnx(model: Any, node: str, state: BNState) -> None:
    """Write ``state`` into the initializers and attributes of one BN node (in place)."""
    helper = require("onnx.helper")
    numpy_helper = require("onnx.numpy_helper")
    nodes = bn_nodes(model)
    if node not in nodes:
        raise BnlabError(f"no BatchNormalization node {node!r}; the model has: "
                         f"{', '.join(nodes) or '(none)'}")
    n = nodes[node]
    roles = ("weight", "bias", "running_mean", "running_var")
    for k, role in enumerate(roles, start=1):
        if _resolve(model, n.input[k]) is None:
            raise BnlabError(f"{node}: input {n.input[k]!r} ({role}) is computed in the "
                             "graph, not stored")
    training = bool(_attrs(n).get("training_mode", 0))
    tracks_here = _keeps_stats(model, n)
    if tracks_here != state.tracks_stats:
        raise BnlabError(
            f"{node}: the node {'keeps' if tracks_here else 'keeps no'} running statistics "
            f"but the state {'has' if state.tracks_stats else 'has none'}"
        )
    c = state.num_features
    w, b = state.filled()
    mean, var, eps = stored_stats(state, eval_node=not training)
    for k, role in enumerate(roles, start=1):
        src = _initializers(model)[str(_resolve(model, n.input[k]))]
        if tuple(src.dims) != (c,):
            raise BnlabError(f"{node}: {role} has shape {tuple(src.dims)}, the state ({c},)")
    made: list[str] = []
    for k, (role, arr) in enumerate(zip(roles, (w, b, mean, var), strict=True), start=1):
        own = _own_input(model, n, k, role, made)
        dt = numpy_helper.to_array(own).dtype
        own.CopyFrom(numpy_helper.from_array(np.asarray(arr, dt), own.name))
    used = {i for nd in model.graph.node for i in nd.input} | {o.name for o in model.graph.output}
    for t in [t for t in model.graph.initializer if t.name in made and t.name not in used]:
        model.graph.initializer.remove(t)  # a copy whose only user was a removed Identity
    momentum = _onnx_momentum(state) if training else _eval_momentum(state)
    keep = [a for a in n.attribute if a.name not in ("epsilon", "momentum")]
    del n.attribute[:]
    n.attribute.extend([*keep, helper.make_attribute("epsilon", eps),
                        helper.make_attribute("momentum", float(momentum))])
    if training and tracks_here:
        check_same_estimator(state, "ONNX BatchNormalization (training_mode=1)", "biased")


def to_onnx(state: BNState, rank: int = 4, *, training: bool = False,
            name: str = "bn") -> Any:
    """A one-node ONNX model ``X → Y`` (channels on axis 1) holding ``state``.

    ``training=True`` gives a ``training_mode=1`` graph that also outputs ``running_mean``
    and ``running_var`` (ONNX's update tracks the biased variance: warned for a torch state).
    A state without running statistics gives a ``training_mode=1`` node without those
    outputs: batch statistics in eval, as torch's ``track_running_stats=False``.
    """
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    if rank < 2:
        raise BnlabError(f"rank must be >= 2 (N, C, ...), got {rank}")
    dt = np.dtype(state.dtype)
    if dt not in _ELEM:
        raise BnlabError(f"ONNX export supports float16/32/64 states, got {dt}")
    c = state.num_features
    w, b = state.filled()
    train_node = training or not state.tracks_stats
    mean, var, eps = stored_stats(state, eval_node=not train_node)
    names = [f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"]
    inits = [numpy_helper.from_array(np.asarray(a, dt), n)
             for n, a in zip(names, (w, b, mean, var), strict=True)]
    # ONNX Runtime wants all three outputs of a training-mode node, used or not.
    outputs = ["Y", "running_mean", "running_var"] if train_node else ["Y"]
    graph_outputs = outputs if training and state.tracks_stats else ["Y"]
    node = helper.make_node(
        "BatchNormalization", ["X", *names], outputs, name=name,
        epsilon=eps,
        momentum=_onnx_momentum(state) if training else _eval_momentum(state),
        training_mode=int(train_node),
    )
    shape: list[Any] = ["N", c, *[f"d{i}" for i in range(2, rank)]]
    elem = _ELEM[dt]
    graph = helper.make_graph(
        [node], f"{name}_graph", [helper.make_tensor_value_info("X", elem, shape)],
        [helper.make_tensor_value_info("Y", elem, shape),
         *[helper.make_tensor_value_info(o, elem, [c]) for o in graph_outputs[1:]]],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    if training and state.tracks_stats:
        check_same_estimator(state, "ONNX BatchNormalization (training_mode=1)", "biased")
    return model


def session(model: Any) -> Any:
    """An ONNX Runtime CPU session for ``model``, one thread (the CI machine is shared)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: overridable initializers are intended
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
