"""The batch-norm family: what every bnlab BN module shares, written once.

Free functions that every module calls (``BatchRenorm*``, ``GhostBatchNorm*``,
``FrozenBatchNorm*``, ``SyncBatchNorm``):

* :func:`check_options`: the constructor checks (C a positive int, eps > 0, momentum in
  [0, 1] or None), a ``ValueError`` naming the argument;
* :func:`check_input`: the input checks (a tensor, an accepted rank, C channels on axis 1);
* :func:`accumulation_dtype`: statistics of float16/bfloat16 inputs are accumulated in
  float32, as torch's BN kernels do;
* :func:`update_running_stats`: PyTorch's momentum convention, ``new = (1 − m)·old +
  m·batch`` with ``m = momentum`` (``1/num_batches_tracked`` when momentum is None). It is
  called after every check of a training forward has passed, so an error never leaves
  ``num_batches_tracked`` advanced.

State is torch's BatchNorm state exactly (``weight``, ``bias`` as parameters;
``running_mean``, ``running_var``, ``num_batches_tracked`` as buffers), so a checkpoint of
``torch.nn.BatchNorm2d`` loads into ``BatchRenorm2d`` / ``GhostBatchNorm2d`` unchanged and
back. ``BatchRenorm*``, ``GhostBatchNorm*`` and ``SyncBatchNorm`` subclass torch's
``_BatchNorm``, so ``isinstance(m, nn.modules.batchnorm._BatchNorm)``,
``reset_running_stats()``, ``torch.optim.swa_utils.update_bn`` and torch's loading of old
checkpoints without ``num_batches_tracked`` all treat them as torch's BatchNorm. Like
torch's, they normalise with the batch statistics in training and, in eval, with the
running statistics whenever the buffers exist (``track_running_stats`` only decides whether
training updates them). ``FrozenBatchNorm*`` does not subclass ``_BatchNorm``: it has no
parameters and no batch statistics, and ``update_bn`` would reset its statistics to 0 and 1
and never learn them back.

Two guards of ``BatchRenorm*`` and ``GhostBatchNorm*`` protect the running statistics
(torch has neither):

* ``skip_nonfinite=True`` (default): when a training batch's mean or variance is not finite
  (a NaN/Inf in the input), the running-stat update of that step is skipped and a
  ``RuntimeWarning`` naming the layer is issued once per layer. ``num_batches_tracked`` is
  not incremented either. The output is still computed from the batch, so the NaN propagates
  exactly as with torch and the loss shows it. One bad batch therefore cannot poison
  ``running_mean``/``running_var`` for good (pytorch issue 88474).
* ``small_batch="error"`` (default) raises torch's "Expected more than 1 value per channel"
  message with a hint; ``small_batch="skip"`` treats such a training batch (e.g. the leftover
  batch of one) as an eval batch: it is normalised with the running statistics and does not
  update them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

SMALL_BATCH_POLICIES = ("error", "skip")

bn_backward = torch.ops.aten.native_batch_norm_backward
"""torch's BN backward kernel, for the custom autograd Functions that reuse it."""

# Accepted ranks and the shape wording for each class family (shared by the docstrings).
RANKS: dict[int, tuple[tuple[int, ...], str]] = {
    1: ((2, 3), "(N, C) or (N, C, L)"),
    2: ((4,), "(N, C, H, W)"),
    3: ((5,), "(N, C, D, H, W)"),
}

SMALL_BATCH_HINT = (
    "A training batch needs more than one value per channel for batch statistics. Drop the "
    "last incomplete batch (DataLoader(..., drop_last=True)), evaluate this input in "
    "model.eval(), or construct the layer with small_batch='skip' to normalise such a batch "
    "with the running statistics instead."
)


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis except the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector (C,) as (1, C, 1, ...) to broadcast against an ndim input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def first_tensor(batch: Any, expected: str) -> Tensor:
    """The input of a batch: the batch itself if a tensor, else the tensor ``batch[0]`` of
    an (input, target) tuple/list; otherwise ``TypeError`` "``expected``, got TYPE"."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"{expected}, got {type(batch).__name__}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block; every module's own train/eval mode is put back in
    ``finally`` (not ``model.train(was)``, which would make them all alike)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, mode in modes:
            m.training = mode


def is_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for float16/bfloat16, else ``dtype``.

    torch's BN kernels keep the statistics of half-precision inputs in float32 (and take
    float32 parameters with them, as under autocast); the elementwise passes stay in the
    input's dtype.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_options(num_features: int, eps: float, momentum: float | None = None) -> None:
    """The constructor checks of every bnlab BN module: C > 0 an int, eps > 0, momentum."""
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not eps > 0:  # also refuses NaN
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None (cumulative), got {momentum!r}")


def check_input(module: Any, x: Any, ranks: tuple[int, ...], shape_text: str) -> None:
    """The input checks of every bnlab BN module (``ranks`` empty: any rank >= 2).

    Raises TypeError for a non-tensor and ValueError for a wrong rank or channel count,
    naming the layer's class, the expected shape and the shape it got.
    """
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expected a torch.Tensor, got {type(x)!r}")
    if ranks and x.dim() not in ranks:
        raise ValueError(
            f"{name} expected input of shape {shape_text} "
            f"({' or '.join(f'{r}-D' for r in ranks)}), got {x.dim()}-D input of "
            f"shape {tuple(x.shape)}"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{name} expected input of shape {shape_text} with a channel axis 1 (at least "
            f"2 dimensions), got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    num_features = int(module.num_features)
    if x.shape[1] != num_features:
        raise ValueError(
            f"{name}({num_features}) expected {num_features} channels on axis 1, got input "
            f"of shape {tuple(x.shape)}"
        )


def check_training_eps(module: Any) -> None:
    """torch's training-time check: batch statistics need ``eps > 0`` (an ``eps`` changed
    after construction is caught here; eval with running statistics accepts eps = 0)."""
    eps = module.eps
    if not eps > 0:
        raise ValueError(
            f"{type(module).__name__}: eps must be > 0 in training (batch statistics), got "
            f"{eps!r}"
        )


def tracks_running_stats(module: nn.Module) -> bool:
    """True when a training forward of ``module`` updates its running statistics (torch's
    rule: ``track_running_stats`` on and the buffers present)."""
    return bool(getattr(module, "track_running_stats", False)) and all(
        getattr(module, key, None) is not None
        for key in ("running_mean", "running_var", "num_batches_tracked")
    )


@torch.no_grad()
def update_running_stats(module: Any, stats: tuple[Tensor, Tensor] | None) -> bool:
    """One training step's update of ``module``'s running statistics, torch's convention::

        num_batches_tracked ← num_batches_tracked + 1
        m = momentum   (1 / num_batches_tracked when momentum is None: a cumulative average)
        running_mean ← (1 − m)·running_mean + m·mean
        running_var  ← (1 − m)·running_var  + m·var_unbiased

    ``stats`` is ``(mean, var_unbiased)`` of the batch (the variance with Bessel's
    correction, as torch stores it), or None for an empty batch: torch then counts the batch
    and leaves both statistics unchanged. The blend runs in the wider of the buffers' and the
    statistics' dtypes. Returns False (and changes nothing) when the module does not track
    statistics (:func:`tracks_running_stats`). Call it only after every check of the forward
    has passed.
    """
    if not tracks_running_stats(module):
        return False
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    nbt.add_(1)
    if stats is None:
        return True
    momentum = module.momentum
    factor = 1.0 / float(nbt) if momentum is None else float(momentum)
    for buffer, batch in zip((rm, rv), stats, strict=True):
        acc = torch.promote_types(buffer.dtype, batch.dtype)
        buffer.copy_(buffer.to(acc) * (1.0 - factor) + batch.detach().to(acc) * factor)
    return True


def load_missing_num_batches_tracked(module: nn.Module, state_dict: Any, prefix: str,
                                     local_metadata: dict[str, Any]) -> None:
    """torch's rule for checkpoints written before ``num_batches_tracked`` existed (version
    < 2 or no version): a missing counter loads as the module's current one (0 when fresh).
    ``_BatchNorm`` subclasses inherit it; modules that are not ``_BatchNorm`` call this."""
    version = local_metadata.get("version")
    key = prefix + "num_batches_tracked"
    if (version is None or version < 2) and key not in state_dict:
        current = getattr(module, "num_batches_tracked", None)
        state_dict[key] = current if current is not None else torch.tensor(0, dtype=torch.long)


class GuardedBatchNorm(_BatchNorm):
    """Base of ``BatchRenorm*`` and ``GhostBatchNorm*``: torch's ``_BatchNorm`` plus guards.

    Subclasses implement :meth:`_train_forward`; eval with running statistics is torch's own
    ``F.batch_norm`` in inference mode, so it equals ``nn.BatchNorm*d.eval()`` exactly.
    """

    _ranks: ClassVar[tuple[int, ...]] = ()
    _shape_text: ClassVar[str] = "(N, C, ...)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        small_batch: str = "error",
        skip_nonfinite: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_options(num_features, eps, momentum)
        if small_batch not in SMALL_BATCH_POLICIES:
            raise ValueError(
                f"small_batch must be one of {SMALL_BATCH_POLICIES}, got {small_batch!r}"
            )
        super().__init__(num_features, float(eps), momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.small_batch = small_batch
        self.skip_nonfinite = skip_nonfinite
        # Name used in warnings; set by replace_norm / name_bn_layers, else class name + id.
        self.layer_name: str | None = None
        self._warned_nonfinite = False

    # ----------------------------------------------------------------- helpers

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"small_batch={self.small_batch!r}, skip_nonfinite={self.skip_nonfinite}"
        )

    def display_name(self) -> str:
        return self.layer_name or f"{type(self).__name__}@{id(self):#x}"

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self._ranks, self._shape_text)

    def _small_batch(self, x: Tensor, values_per_channel: int) -> bool:
        """Apply the ``small_batch`` policy; True means: normalise with running stats.

        Only a batch with exactly one value per channel is small: an empty batch (0 values)
        is normalised to an empty output, as torch does.
        """
        if values_per_channel != 1:
            return False
        if self.small_batch == "error":
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{torch.Size(x.shape)} (layer {self.display_name()}). {SMALL_BATCH_HINT}"
            )
        if self.running_mean is None or self.running_var is None:
            raise ValueError(
                f"small_batch='skip' normalises a batch of one with the running statistics, "
                f"but layer {self.display_name()} has none (track_running_stats=False); got "
                f"input size {torch.Size(x.shape)}"
            )
        return True

    def _eval_forward(self, x: Tensor) -> Tensor:
        """Plain BN with the running statistics (torch's own inference kernel)."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _update_running(self, mean: Tensor, var_unbiased: Tensor) -> bool:
        """:func:`update_running_stats` behind the ``skip_nonfinite`` guard.

        Returns False (and changes nothing) when the statistics are not finite and
        ``skip_nonfinite`` is on, or when the layer does not track statistics.
        """
        if not tracks_running_stats(self):
            return False
        if self.skip_nonfinite and not is_finite(mean, var_unbiased):
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"non-finite batch statistics in layer {self.display_name()}: this step's "
                    "running-statistics update was skipped (skip_nonfinite=True); further "
                    "skips in this layer are silent",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        return self._record((mean, var_unbiased))

    def _record(self, stats: tuple[Tensor, Tensor] | None) -> bool:
        """:func:`update_running_stats`, then the subclass's hook when the batch counted."""
        counted = update_running_stats(self, stats)
        if counted:
            self._counted()
        return counted

    def _counted(self) -> None:
        """Hook called once per counted training batch (Batch Renorm's warm-up)."""

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            if x.numel() == 0:
                # An empty batch, as torch: empty output, zero parameter gradients, counted
                # in num_batches_tracked with the statistics unchanged.
                check_training_eps(self)
                self._record(None)
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return self._train_forward(x)
        if self.running_mean is None or self.running_var is None:
            # Eval without running statistics: the whole batch's statistics, as torch does.
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return self._eval_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def differentiable_grads(forward: Callable[[], Tensor], inputs: Sequence[Tensor | None],
                         needs: Sequence[bool], dy: Tensor) -> list[Tensor | None]:
    """Gradients of ``forward()`` with respect to ``inputs``, as differentiable tensors.

    For the custom autograd Functions here under ``create_graph=True`` (double backward):
    their fast backward is not differentiable, so they recompute the forward from
    differentiable ops and differentiate that. ``needs`` is ``ctx.needs_input_grad`` for
    ``inputs``; an input that is not needed (or None) gets None.
    """
    needed = [bool(need) and t is not None for t, need in zip(inputs, needs, strict=True)]
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need and t is not None]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(forward(), wanted, dy, create_graph=True))
    return [next(grads) if need else None for need in needed]


def rank_doc(template: str, dim: int, name: str, **extra: str) -> str:
    """Fill a family docstring for the ``dim``-d class (one text for 1d/2d/3d)."""
    return template.format(name=name, shape=RANKS[dim][1], dim=dim, **extra)
