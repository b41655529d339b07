"""What the model-rewriting functions may do with a layer, and what they report.

``fold_bn``, ``replace_norm``, ``freeze_bn``, ``unfreeze_bn`` and ``convert_sync_batchnorm``
replace a batch-norm layer by another one that computes the same normalisation. That is only
right when the layer computes nothing else. Model zoos build networks from BN *subclasses*
that do more (timm's ``BatchNormAct2d``: BN, then drop, then an activation), so every layer
is first put in one of three forms by :func:`bn_form`:

``plain``
    Its class is torch's or bnlab's own, or a subclass that overrides none of its base
    class's methods other than construction, ``extra_repr``, the input check and state
    loading (so its ``forward`` *is* the base's). It is what the base computes.
``tail``
    A subclass that overrides ``forward`` only, proven on probe inputs to compute
    ``tail(base.forward(x))``, where the tail is its own ``drop`` then ``act`` modules (timm),
    its ``act`` module, or one of torch's activations (ReLU, LeakyReLU with the layer's
    ``activation_param``, …). The rewrite replaces the normalisation and keeps the tail:
    the layer becomes :class:`NormAct` (``norm``, then the same ``drop``/``act`` modules).
``unproven``
    Anything else (another override, forward hooks, a forward that matches no tail). The
    rewrite leaves the layer as it is and warns (:class:`RewriteWarning`), naming the layer
    and the reason.

The probes: the layer and a base-class evaluation of it, copied to float64, with the layer's
own and with random statistics and affine parameters, in eval and in training mode (the
same random seed for both sides, so dropout draws the same mask), on a few input shapes;
the outputs and the updated running statistics must agree to 1e-12 (the batch counter
exactly). A probe is evidence, not a
proof: a forward that branches on a condition the probes never meet can still fool it.

A Conv/Linear subclass may take a folded BN when it overrides nothing (torchvision's
``Conv3DSimple``), or when probes show ``f(W·s, b·s + t) = f(W, b)·s + t`` for random
per-output-channel ``s``, ``t`` (timm's ``Conv2dSame``: pad, then convolve), which is exactly
what folding relies on (:func:`conv_fold_check`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

FOLDABLE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Methods a subclass may override without changing what its base's forward computes.
_NEUTRAL = frozenset({
    "__init__", "__repr__", "__setstate__", "__getstate__", "extra_repr", "_get_name",
    "_check_input_dim", "reset_parameters", "reset_running_stats", "_load_from_state_dict",
})
_PROBE_TOL = 1e-12


class RewriteWarning(RuntimeWarning):
    """A rewriting function left a layer as it was, or could not do all it was asked."""


@dataclass(frozen=True)
class Entry:
    """One line of a :class:`RewriteReport`: a layer, what happened to it, and why."""

    layer: str
    action: str
    detail: str


@dataclass
class RewriteReport:
    """What a rewriting function did, layer by layer.

    ``action`` is one of ``"folded"`` (into the Conv/Linear named in ``detail``),
    ``"affine"`` (a BN that could not be folded, now a fixed per-channel affine),
    ``"replaced"``, ``"converted"``, ``"recalibrated"``, ``"left"`` (unchanged; ``detail``
    says why) or ``"skipped"``. ``notes`` holds model-level remarks (an untraceable model).
    ``str(report)`` is a readable table.
    """

    function: str
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, layer: str, action: str, detail: str = "") -> None:
        self.entries.append(Entry(layer, action, detail))

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.entries)

    def layers(self, action: str) -> list[str]:
        return [e.layer for e in self.entries if e.action == action]

    def __str__(self) -> str:
        width = max([len(e.layer) for e in self.entries] + [5])
        lines = [f"{self.function}: " + ", ".join(
            f"{self.count(a)} {a}" for a in dict.fromkeys(e.action for e in self.entries)
        ) if self.entries else f"{self.function}: no batch-norm layer"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [
            f"  {e.layer:<{width}}  {e.action:<12}  {e.detail}".rstrip() for e in self.entries
        ]
        return "\n".join(lines)


class NormAct(nn.Module):
    """A normalisation layer followed by what a fused BN+activation layer applied after it.

    ``forward(x) = act(drop(norm(x)))`` (a missing ``drop`` or ``act`` is skipped). The
    rewriting functions build it from a ``tail``-form BN subclass, reusing its own ``drop``
    and ``act`` modules; ``norm`` is the new layer (folded away, frozen, renormalising,
    synchronised …). State-dict keys of the normalisation gain the prefix ``norm.``.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if "drop" in self._modules:
            x = self.drop(x)
        if "act" in self._modules:
            x = self.act(x)
        return x


@dataclass(frozen=True)
class BNForm:
    """:func:`bn_form`'s verdict: ``kind`` is ``"plain"``, ``"tail"`` or ``"unproven"``."""

    kind: str
    tail: tuple[tuple[str, nn.Module], ...] = ()
    reason: str = ""

    def wrap(self, norm: nn.Module) -> nn.Module:
        """``norm`` followed by this form's tail (``norm`` itself when there is none)."""
        if not self.tail:
            return norm
        return NormAct(norm, **dict(self.tail))


def library_base(cls: type) -> type:
    """The nearest class in ``cls``'s MRO that torch or bnlab.nn defines."""
    for klass in cls.__mro__:
        module = klass.__module__
        if module.split(".")[0] == "torch" or module.startswith("bnlab.nn."):
            return klass
    return nn.Module


def overrides(cls: type, base: type) -> list[str]:
    """Methods of ``base`` that ``cls`` (or a class between them) redefines, bar neutral ones."""
    names: dict[str, None] = {}
    for klass in cls.__mro__:
        if klass is base:
            break
        for name, value in vars(klass).items():
            if name in _NEUTRAL or not hasattr(base, name):
                continue
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                names[name] = None
    return list(names)


def has_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks on the module itself, which a rewrite of it would drop."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _probe_shapes(layer: nn.Module, channels: int) -> list[tuple[int, ...]]:
    ranks: tuple[int, ...] = tuple(getattr(layer, "_ranks", None) or ())
    if not ranks:
        torch_ranks = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)))
        ranks = next((r for cls, r in torch_ranks if isinstance(layer, cls)), (4, 2, 3, 5))
    by_rank = {2: (6, channels), 3: (3, channels, 5), 4: (3, channels, 3, 4),
               5: (2, channels, 2, 3, 3)}
    shapes = [by_rank[r] for r in ranks]
    return [*shapes, (shapes[0][0] + 2, *shapes[0][1:])]


def _randomise(layer: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name in ("running_mean", "weight", "bias"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        rv = getattr(layer, "running_var", None)
        if isinstance(rv, Tensor):
            rv.copy_(torch.rand(rv.shape, generator=gen, dtype=rv.dtype) + 0.5)


def _run(fn: Callable[[], Tensor], seed: int) -> Tensor | None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return fn()
        except Exception:  # a forward that rejects a probe shape: compared as "raised"
            return None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(
        torch.allclose(a, b, rtol=_PROBE_TOL, atol=_PROBE_TOL, equal_nan=True)
    )


def _matches(layer: nn.Module, base: Any, resolve: Callable[[nn.Module], list[nn.Module]]
             ) -> bool:
    """Does ``layer(x)`` equal ``tail(base.forward(layer, x))`` on every probe?"""
    channels = int(getattr(layer, "num_features", 0) or 0)
    if channels <= 0:
        return False
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for randomise in (False, True):
        try:
            ours = copy.deepcopy(layer).double()
        except Exception:
            return False
        if randomise:
            _randomise(ours, gen)
        for training in (False, True):
            theirs = copy.deepcopy(ours)
            ours.train(training)
            theirs.train(training)
            tail = resolve(theirs)
            for shape in _probe_shapes(layer, channels):
                x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 0.5

                def apply(theirs: nn.Module = theirs, x: Tensor = x,
                          tail: list[nn.Module] = tail) -> Tensor:
                    z = base.forward(theirs, x)
                    for m in tail:
                        z = m(z)
                    return z

                def call(ours: nn.Module = ours, x: Tensor = x) -> Tensor:
                    return ours(x)

                with torch.no_grad():
                    a = _run(call, compared)
                    b = _run(apply, compared)
                if (a is None) != (b is None):
                    return False
                if a is None or b is None:
                    continue
                if not _same(a, b):
                    return False
                compared += 1
            for t, u in zip(ours.buffers(), theirs.buffers(), strict=True):
                same = _same(t, u) if t.is_floating_point() else torch.equal(t, u)
                if not same:  # running statistics updated differently in training
                    return False
    return compared > 0


def _catalogue(layer: nn.Module) -> Iterator[tuple[tuple[str, Any], ...]]:
    """Candidate tails, most specific first: (name, attribute name or module) pairs."""
    drop, act = getattr(layer, "drop", None), getattr(layer, "act", None)
    if isinstance(act, nn.Module):
        if isinstance(drop, nn.Module):
            yield (("drop", "drop"), ("act", "act"))
        yield (("act", "act"),)
    elif isinstance(drop, nn.Module):
        yield (("drop", "drop"),)
    param = getattr(layer, "activation_param", None)
    p = float(param) if isinstance(param, (int, float)) and not isinstance(param, bool) else None
    for act_module in (
        nn.Identity(), nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.01 if p is None else p),
        nn.ELU(1.0 if p is None else p), nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid(),
        nn.Tanh(), nn.Hardswish(), nn.Hardsigmoid(), nn.Mish(),
    ):
        yield (("act", act_module),)


def bn_form(layer: nn.Module) -> BNForm:
    """Classify a batch-norm layer as ``plain``, ``tail`` (with its tail) or ``unproven``."""
    if has_hooks(layer):
        return BNForm("unproven", reason="it has forward hooks, which a rewrite would drop")
    cls = type(layer)
    base = library_base(cls)
    if base is cls:
        return BNForm("plain")
    changed = overrides(cls, base)
    if not changed:
        return BNForm("plain")
    name = f"{cls.__name__} (a {base.__name__} subclass)"
    if changed != ["forward"]:
        return BNForm("unproven", reason=f"{name} overrides {', '.join(changed)}")
    for candidate in _catalogue(layer):

        def resolve(copy_of_layer: nn.Module, candidate: Any = candidate) -> list[nn.Module]:
            return [
                getattr(copy_of_layer, what) if isinstance(what, str) else what.double()
                for _, what in candidate
            ]

        if _matches(layer, base, resolve):
            tail = tuple(
                (slot, getattr(layer, what) if isinstance(what, str) else what)
                for slot, what in candidate
            )
            return BNForm("tail", tail=tuple((s, m) for s, m in tail if type(m) is not
                                             nn.Identity))
    return BNForm(
        "unproven",
        reason=f"{name} overrides forward and probes match no known pattern "
        f"({base.__name__} followed by its drop/act modules or by a torch activation)",
    )


def conv_fold_check(layer: nn.Module) -> str:
    """'' when a BN after ``layer`` (a Conv1d/2d/3d or Linear, or subclass) can be folded
    into its weight and bias; else the reason it cannot."""
    if not isinstance(layer, FOLDABLE):
        return f"its input comes from {type(layer).__name__}, not a Conv/Linear"
    if has_hooks(layer):
        return f"{type(layer).__name__} has forward hooks, which folding would drop"
    base = library_base(type(layer))
    changed = overrides(type(layer), base)
    if not changed or _affine_in_parameters(layer):
        return ""
    return (
        f"{type(layer).__name__} (a {base.__name__} subclass) overrides {', '.join(changed)}, "
        "not proven affine in its weight and bias on probe inputs"
    )


def _affine_in_parameters(layer: Any) -> bool:
    """On probes: ``f(W·s, b·s + t) = f(W, b)·s + t`` per output channel (s, t random)."""
    try:
        probe = copy.deepcopy(layer).double()
    except Exception:
        return False
    gen = torch.Generator().manual_seed(0)
    weight = probe.weight
    out = weight.shape[0]
    if isinstance(probe, nn.Linear):
        shapes: list[tuple[int, ...]] = [(3, probe.in_features), (4, probe.in_features)]
    else:
        spatial = weight.dim() - 2
        reach = max(d * (k - 1) + 1 for d, k in zip(probe.dilation, probe.kernel_size,
                                                   strict=True))
        shapes = [(2, probe.in_channels, *[reach + 3 + i] * spatial) for i in (0, 1)]
    view = (-1,) + (1,) * (weight.dim() - 1)

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        probe.weight = nn.Parameter(w)
        probe.bias = nn.Parameter(b)
        return probe(x)

    try:
        with torch.no_grad():
            for shape in shapes:
                x = torch.randn(shape, generator=gen, dtype=torch.float64)
                w = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
                b, s, t = (torch.randn(out, generator=gen, dtype=torch.float64)
                           for _ in range(3))
                y = f(x, w, b)
                folded = f(x, w * s.view(view), b * s + t)
                expected = y * s.view(1, -1, *[1] * (y.dim() - 2)) + t.view(
                    1, -1, *[1] * (y.dim() - 2))
                if not _same(folded, expected):
                    return False
    except Exception:  # a forward that rejects the probe: not proven
        return False
    return True


def warn(function: str, layer: str, reason: str) -> None:
    import warnings

    warnings.warn(f"{function}: left layer {layer!r} unchanged: {reason}", RewriteWarning,
                  stacklevel=3)


def rewrite_modules(model: nn.Module, pick: Callable[[nn.Module], bool],
                    make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every submodule ``m`` with ``pick(m)`` by ``make(name, m)``, in place.

    ``make`` returns None to leave a module as it is. A module registered under several
    names is made once (under its first name) and stays shared. Returns the new root.
    """
    names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    if pick(model):
        new = make(names[id(model)], model)
        return model if new is None else new
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a child registered twice.
        for child_name, child in list(parent._modules.items()):
            if child is None or not pick(child):
                continue
            if id(child) not in done:
                new = make(names[id(child)], child)
                done[id(child)] = child if new is None else new
            if done[id(child)] is not child:
                setattr(parent, child_name, done[id(child)])
    return model


__all__ = ["NormAct", "RewriteReport", "RewriteWarning", "bn_form", "conv_fold_check"]
