"""Whole models: find every BN layer by name, read their states, write them by a name mapping.

A model is a ``torch.nn.Module``, a Keras model or layer, a Flax linen model as the pair
``(module, variables)`` (its BN layers are found by running it once on ``example``), a
``flax.nnx.Module`` or an ONNX ``ModelProto``. Names are the framework's own: torch's
``named_modules()`` names, Keras layer names, Flax module paths joined by ".", nnx attribute
paths joined by ".", ONNX names from :func:`bnlab.port._onnx.bn_nodes`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from typing import Any

from bnlab.errors import BnlabError
from bnlab.port import _flax, _keras, _onnx, _torch
from bnlab.port._state import BNState

Names = Mapping[str, str] | Callable[[str], str] | None


def framework_of(model: Any) -> str:
    """``"torch"``, ``"keras"``, ``"flax"``, ``"nnx"`` or ``"onnx"``.

    An object of a framework means that framework is imported: nothing new is imported here.
    """
    if isinstance(model, tuple) and len(model) == 2:
        return "flax"
    if _torch.is_torch_bn(model):
        return "torch"
    checks = (("torch", "torch", "nn.Module"), ("keras", "keras", "layers.Layer"),
              ("nnx", "flax.nnx", "Module"), ("onnx", "onnx", "ModelProto"))
    for fw, module, attr in checks:
        if module in sys.modules:
            cls: Any = sys.modules[module]
            for part in attr.split("."):
                cls = getattr(cls, part)
            if isinstance(model, cls):
                return fw
    raise BnlabError(
        f"cannot tell the framework of a {type(model).__name__}: expected a torch module, a "
        "Keras model, (flax module, variables), a flax.nnx module or an ONNX ModelProto"
    )


def _keras_layers(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(layer: Any) -> None:
        if _keras.is_keras_bn(layer):
            out[layer.name] = layer
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)

    walk(model)
    return out


def _flax_layers(model: tuple[Any, Any], example: tuple[Any, ...],
                 example_kwargs: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    linen = _flax.require("flax.linen")
    module, variables = model
    if not example:
        raise BnlabError("a Flax linen model's BN layers are found by running it: pass "
                         "example=(input,) (and example_kwargs for its other arguments)")
    found: dict[str, tuple[tuple[str, ...], Any]] = {}

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        m = context.module
        if context.method_name == "__call__" and _flax.is_linen_bn(m):
            path = tuple(m.scope.path)
            found[".".join(path)] = (path, m)
        return next_fun(*args, **kwargs)

    jax = _flax.require("jax")
    with linen.intercept_methods(interceptor):  # traced only: nothing is computed
        jax.eval_shape(lambda v, *a: module.apply(v, *a, mutable=["batch_stats"],
                                                  **dict(example_kwargs)), variables, *example)
    return found


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _nnx_layers(model: Any) -> dict[str, Any]:
    nnx = _flax.require("flax.nnx")
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.BatchNorm)}


def read_bn_layers(model: Any, *, example: tuple[Any, ...] = (),
                   example_kwargs: Mapping[str, Any] | None = None) -> dict[str, BNState]:
    """Every BN layer's state, by its name in ``model``'s framework."""
    fw = framework_of(model)
    if fw == "torch":
        if _torch.is_torch_bn(model):
            return {"": _torch.from_torch(model)}
        return {n: _torch.from_torch(m) for n, m in model.named_modules() if _torch.is_torch_bn(m)}
    if fw == "keras":
        return {n: _keras.from_keras(layer) for n, layer in _keras_layers(model).items()}
    if fw == "flax":
        _, variables = model
        out = {}
        for n, (path, m) in _flax_layers(model, example, example_kwargs or {}).items():
            sub = {c: _subtree(variables[c], path) for c in ("params", "batch_stats")
                   if c in variables and _has(variables[c], path)}
            out[n] = _flax.from_flax(m, sub)
        return out
    if fw == "nnx":
        return {n: _flax.from_nnx(bn) for n, bn in _nnx_layers(model).items()}
    return {n: _onnx.from_onnx(model, n) for n in _onnx.bn_nodes(model)}


def _has(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    try:
        _subtree(tree, path)
    except (KeyError, TypeError):
        return False
    return True


def _rename(names: Names, src: str) -> str:
    if names is None:
        return src
    if callable(names):
        return names(src)
    if src not in names:
        raise BnlabError(f"the name mapping has no entry for the source BN layer {src!r}")
    return names[src]


def load_bn_layers(model: Any, states: Mapping[str, BNState], *, names: Names = None,
                   example: tuple[Any, ...] = (),
                   example_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Write ``states`` (source name → state) into ``model``'s BN layers.

    ``names`` maps a source name to the target's (a dict or a function; default: the same
    name). Every state must land on a BN layer and every BN layer of ``model`` must get a
    state, else a BnlabError lists what is unmatched. Returns the model (changed in place),
    or for Flax the new variables.
    """
    fw = framework_of(model)
    mapped = {_rename(names, s): (s, st) for s, st in states.items()}
    if fw == "torch":
        targets: Mapping[str, Any] = ({"": model} if _torch.is_torch_bn(model) else
                                      {n: m for n, m in model.named_modules()
                                       if _torch.is_torch_bn(m)})
    elif fw == "keras":
        targets = _keras_layers(model)
    elif fw == "flax":
        targets = _flax_layers(model, example, example_kwargs or {})
    elif fw == "nnx":
        targets = _nnx_layers(model)
    else:
        targets = _onnx.bn_nodes(model)
    unknown = sorted(set(mapped) - set(targets))
    unfilled = sorted(set(targets) - set(mapped))
    if unknown or unfilled:
        raise BnlabError(
            f"BN layers do not match: no target layer for {unknown or 'none'}; target layers "
            f"without a state: {unfilled or 'none'} (target has: {', '.join(targets)})"
        )
    if fw == "flax":
        _, variables = model
        new = copy.deepcopy(_plain(variables))
        for name, (path, m) in targets.items():
            sub = _flax.layer_variables(m, mapped[name][1], label=name)
            for coll, leaves in sub.items():
                _subtree(new[coll], path[:-1])[path[-1]] = leaves
        return new
    for name, target in targets.items():
        state = mapped[name][1]
        if fw == "torch":
            _torch.load_torch(target, state, name=name)
        elif fw == "keras":
            _keras.load_keras(target, state, name=name)
        elif fw == "nnx":
            _flax.load_nnx(target, state, name=name)
        else:
            _onnx.load_onnx(model, name, state)
    return model


def _plain(tree: Any) -> Any:
    """Nested dicts (FrozenDict or dict) as plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def convert_bn_layers(src: Any, dst: Any, *, names: Names = None,
                      src_example: tuple[Any, ...] = (), dst_example: tuple[Any, ...] = (),
                      src_example_kwargs: Mapping[str, Any] | None = None,
                      dst_example_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Copy every BN layer of ``src`` into ``dst`` by name, converting the conventions.

    Only BN layers are written; the other layers' weights are the caller's. Returns what
    :func:`load_bn_layers` returns.
    """
    states = read_bn_layers(src, example=src_example, example_kwargs=src_example_kwargs)
    return load_bn_layers(dst, states, names=names, example=dst_example,
                          example_kwargs=dst_example_kwargs)
