"""PyTorch side: ``nn.BatchNorm1d/2d/3d``, bnlab's BN modules and ``bnlab.core``'s layers.

All of them keep torch's state under torch's names (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``, ``eps``, ``momentum``), so one reader serves them.
:class:`BiasedBatchNorm2d` (and 1d/3d) is ``nn.BatchNorm2d`` with the running variance
tracking the *biased* batch variance: Keras', Flax' and ONNX's rule, for continuing in
PyTorch a training that started there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnlab.errors import BnlabError
from bnlab.port._state import BNState, check_same_estimator, warn

_OTHER_TRAINING = {
    "FrozenBatchNorm": "is a fixed affine map in training too",
    "BatchRenorm": "trains with renormalised batch statistics (r, d)",
    "GhostBatchNorm": "trains with per-chunk (virtual batch) statistics",
}


def _numpy(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy().copy()
    return np.array(t, copy=True)


def is_torch_bn(obj: Any) -> bool:
    """A torch/bnlab BN module or a bnlab.core BN layer (duck-typed on torch's state names)."""
    return all(hasattr(obj, a) for a in ("running_mean", "running_var", "eps")) and hasattr(
        obj, "num_features"
    )


def variance_update_of(module: Any) -> str:
    return "biased" if isinstance(module, _BiasedMixin) else "unbiased"


def from_torch(module: Any) -> BNState:
    """Read a torch ``nn.BatchNorm*``, bnlab BN module or ``bnlab.core.BatchNorm*`` layer."""
    if not is_torch_bn(module):
        raise BnlabError(
            f"expected a PyTorch batch-norm layer (nn.BatchNorm1d/2d/3d, bnlab.nn or "
            f"bnlab.core), got {type(module).__name__}"
        )
    name = type(module).__name__
    for prefix, why in _OTHER_TRAINING.items():
        if name.startswith(prefix):
            warn(f"{name} {why}: the converted layer is plain batch norm, exact in eval "
                 "but not in training")
    nbt = getattr(module, "num_batches_tracked", None)
    return BNState(
        weight=_numpy(getattr(module, "weight", None)),
        bias=_numpy(getattr(module, "bias", None)),
        mean=_numpy(module.running_mean),
        var=_numpy(module.running_var),
        eps=float(module.eps),
        momentum=getattr(module, "momentum", 0.1),
        num_batches_tracked=None if nbt is None else int(nbt),
        variance_update=variance_update_of(module),
        source=f"PyTorch {name}",
    )


def _set(module: Any, attr: str, value: np.ndarray) -> None:
    target = getattr(module, attr)
    if hasattr(target, "copy_"):
        import torch

        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    else:
        target[...] = value


def load_torch(module: Any, state: BNState, *, name: str = "") -> None:
    """Write ``state`` into an existing torch/bnlab BN module (in place)."""
    label = name or type(module).__name__
    if not is_torch_bn(module):
        raise BnlabError(f"{label}: expected a PyTorch batch-norm layer, got "
                         f"{type(module).__name__}")
    if int(module.num_features) != state.num_features:
        raise BnlabError(f"{label}: has {module.num_features} channels, the state "
                         f"{state.num_features}")
    has_affine = getattr(module, "weight", None) is not None
    if not has_affine and state.affine:
        w, b = state.filled()
        if not (np.all(w == 1) and np.all(b == 0)):
            raise BnlabError(f"{label} has affine=False but the state has a scale/offset "
                             "that is not the identity")
    tracks = module.running_mean is not None
    if tracks != state.tracks_stats:
        raise BnlabError(
            f"{label}: track_running_stats={tracks} but the state "
            f"{'has' if state.tracks_stats else 'has no'} running statistics"
        )
    if has_affine:
        w, b = state.filled()
        _set(module, "weight", w)
        _set(module, "bias", b)
    if tracks:
        assert state.mean is not None and state.var is not None  # for mypy: tracks_stats
        _set(module, "running_mean", state.mean)
        _set(module, "running_var", state.var)
        if getattr(module, "num_batches_tracked", None) is not None:
            n = state.num_batches_tracked or 0
            if hasattr(module.num_batches_tracked, "fill_"):
                module.num_batches_tracked.fill_(n)
            else:
                module.num_batches_tracked = n
    module.eps = state.eps
    if hasattr(module, "momentum"):
        module.momentum = state.momentum
    check_same_estimator(state, f"PyTorch {type(module).__name__}", variance_update_of(module))


def to_torch(state: BNState, dim: int = 2, *, update_rule: str = "source") -> Any:
    """A new ``nn.BatchNorm{dim}d`` holding ``state``, in the state's dtype.

    ``update_rule="source"`` (default) keeps the source's training rule exactly: a state
    whose running variance tracks the biased batch variance (Keras, Flax, ONNX) gives a
    :class:`BiasedBatchNorm{dim}d`. ``"target"`` always gives torch's own class, and warns
    when its variance update differs.
    """
    import torch

    if dim not in (1, 2, 3):
        raise BnlabError(f"dim must be 1, 2 or 3, got {dim}")
    if update_rule not in ("source", "target"):
        raise BnlabError(f"update_rule must be 'source' or 'target', got {update_rule!r}")
    biased = update_rule == "source" and state.variance_update == "biased"
    cls = biased_class(dim) if biased else {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
                                            3: torch.nn.BatchNorm3d}[dim]
    dtype = {np.float16: torch.float16, np.float32: torch.float32,
             np.float64: torch.float64}[state.dtype.type]
    module = cls(state.num_features, eps=state.eps, momentum=state.momentum,
                 affine=state.affine, track_running_stats=state.tracks_stats, dtype=dtype)
    load_torch(module, state)
    return module


def _make_biased() -> dict[int, type]:
    import torch
    from torch.nn import functional as F

    class _Biased:
        """Running variance tracks the biased batch variance (no n/(n−1) factor)."""

        def forward(self, x: Any) -> Any:
            self._check_input_dim(x)  # type: ignore[attr-defined]
            if not (self.training and self.track_running_stats):  # type: ignore[attr-defined]
                return super().forward(x)  # type: ignore[misc]
            out = F.batch_norm(x, None, None, self.weight, self.bias,  # type: ignore[attr-defined]
                               True, 0.0, self.eps)  # type: ignore[attr-defined]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                m = self.momentum  # type: ignore[attr-defined]
                factor = 1.0 / float(self.num_batches_tracked) if m is None else m  # type: ignore[attr-defined]
                dims = [0, *range(2, x.dim())]
                # float16 input: statistics in float32, as torch's own kernel computes them.
                xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                var, mean = torch.var_mean(xs, dim=dims, correction=0)
                for buf, batch in ((self.running_mean, mean), (self.running_var, var)):  # type: ignore[attr-defined]
                    buf.mul_(1.0 - factor).add_(batch.to(buf.dtype), alpha=factor)
            return out

    classes: dict[int, type] = {}
    for d, base in ((1, torch.nn.BatchNorm1d), (2, torch.nn.BatchNorm2d),
                    (3, torch.nn.BatchNorm3d)):
        doc = (f"``nn.BatchNorm{d}d`` whose running variance tracks the biased batch "
               "variance, as Keras', Flax' and ONNX's do; normalisation, eval and state "
               "are torch's.")
        classes[d] = type(f"BiasedBatchNorm{d}d", (_BiasedMixin, _Biased, base),
                          {"__doc__": doc, "__module__": __name__})
    return classes


class _BiasedMixin:
    """Marks the biased-variance classes (isinstance checks without importing torch here)."""


_BIASED: dict[int, type] = {}


def biased_class(dim: int) -> type:
    """``BiasedBatchNorm{dim}d`` (built on first use, so that importing this needs no torch)."""
    if not _BIASED:
        _BIASED.update(_make_biased())
    return _BIASED[dim]
