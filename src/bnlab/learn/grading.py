"""Grade a learner's exercise file against :mod:`bnlab.core` and torch.

The learner's file runs in a child process (:mod:`bnlab.learn._child`) with a timeout; only
arrays come back. Every case is randomized (``seed`` makes a run reproducible). A wrong
answer is compared with the answers that known mistakes produce, each computed exactly,
so the feedback names the mistake rather than a number::

    your running_var is the biased variance: PyTorch stores the unbiased one, n/(n−1) larger

The four teaching bugs documented in the materials learners use each have their own
message: the unbiased variance used to normalise (karpathy/nn-zero-to-hero#44), the
running variance initialised to 0 (CS231n's starter code), the opposite momentum
convention (d2l-ai/d2l-en#2213) and batch statistics at inference, with the case of a
training flag that is never switched off (karpathy/nn-zero-to-hero#82, #83).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.core import functional as F
from bnlab.errors import BnlabError
from bnlab.learn import _child

Case = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]

# Relative tolerance of a match: max|yours − expected| ≤ TOL · (1 + max|expected|). Every
# case is float64; a correct float64 answer is ~1e-15 off, the mistakes below ≥ 1e-4.
TOL = 1e-7

# ---------------------------------------------------------------------- the feedback

UNBIASED_NORMALISE = (
    "you normalised with the unbiased variance (÷ (n−1)): batch norm normalises with the "
    "biased batch variance (÷ n), as PyTorch and the paper's Algorithm 1 do; only "
    "running_var stores the unbiased one (karpathy/nn-zero-to-hero#44). NumPy's x.var() "
    "is biased; torch's x.var() is not (use unbiased=False there)"
)
RUNNING_VAR_ZERO = (
    "running_var starts at 0: PyTorch starts it at 1 (and running_mean at 0). Started at 0, "
    "an early evaluation divides by sqrt(momentum·var + eps) and blows the outputs up "
    "(CS231n's starter code has this bug)"
)
OPPOSITE_MOMENTUM = (
    "you used the opposite momentum convention, new = momentum·old + (1−momentum)·batch: "
    "in PyTorch momentum is the new batch's share, new = (1−momentum)·old + momentum·batch, "
    "default 0.1 (Keras' and TensorFlow's momentum=0.99 is PyTorch's 0.01; "
    "d2l-ai/d2l-en#2213)"
)
BATCH_STATS_AT_INFERENCE = (
    "in eval mode you normalised with the batch statistics: inference must use "
    "running_mean and running_var, so that an output does not depend on the other samples "
    "in the batch (a batch of one would even be all beta)"
)
TRAINING_NEVER_OFF = (
    "the training flag was never switched off: after eval() the layer still normalised with "
    "the batch statistics and updated the running statistics. eval() must set "
    "self.training = False, and __call__ must check it (karpathy/nn-zero-to-hero#82, #83)"
)


def biased_running_var_message(n: int) -> str:
    return (f"your running_var is the biased variance: PyTorch stores the unbiased one, "
            f"n/(n−1) larger (here n = {n}: ×{n / (n - 1):.4g})")


# ---------------------------------------------------------------------- comparing


def _diff(yours: np.ndarray, expected: np.ndarray) -> float:
    """max |yours − expected| relative to 1 + max|expected|; inf for a shape mismatch."""
    if yours.shape != expected.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        d = np.abs(yours - expected)
    if not np.all(np.isfinite(d)):
        return float("inf")
    scale = 1.0 + float(np.max(np.abs(expected), initial=0.0))
    return float(np.max(d, initial=0.0)) / scale


def _close(yours: np.ndarray, expected: np.ndarray) -> bool:
    return _diff(yours, expected) <= TOL


def _shape_problem(name: str, yours: np.ndarray, expected: np.ndarray) -> str | None:
    if yours.shape != expected.shape:
        return f"{name} has shape {yours.shape}, expected {expected.shape}"
    return None


@dataclass
class _Diagnosis:
    """A set of mistakes (flag name -> message) and how to compute the answer they give."""

    messages: tuple[str, ...]
    compute: Callable[[Case], np.ndarray]


def _diagnose(
    name: str,
    cases: Sequence[Case],
    yours: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    variants: Iterable[_Diagnosis],
    describe: Callable[[Case], str],
    against: str = "bnlab.core's answer",
) -> tuple[list[str], float]:
    """Compare per case; on a mismatch name the variant that explains every failing case."""
    diffs = [_diff(y, e) for y, e in zip(yours, expected, strict=True)]
    failing = [i for i, d in enumerate(diffs) if d > TOL]
    worst = max(diffs, default=0.0)
    if not failing:
        return [], worst
    first = failing[0]
    shape = _shape_problem(name, yours[first], expected[first])
    if shape is not None:
        return [f"{shape} (case {first + 1}: {describe(cases[first])})"], worst
    variants = list(variants)
    for scope in (failing, [first]):
        for v in variants:
            with np.errstate(all="ignore"):
                if all(_close(yours[i], v.compute(cases[i])) for i in scope):
                    where = (f"{len(failing)} of {len(cases)} cases" if scope is failing
                             else f"case {first + 1}: {describe(cases[first])}")
                    return [f"{name}: {m} [{where}]" for m in v.messages], worst
    return [
        f"{name} differs from {against} by up to {diffs[first]:.3g} (relative) in "
        f"case {first + 1} ({describe(cases[first])}); {len(failing)} of {len(cases)} cases "
        f"fail, and it matches none of the usual mistakes"
    ], worst


# ---------------------------------------------------------------------- references


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch


def _core_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    y, _ = F.batch_norm_forward(x, gamma, beta, eps=eps, training=True)
    return y


def _torch_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    torch = _torch()
    y = torch.nn.functional.batch_norm(
        torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta),
        training=True, eps=eps,
    )
    return y.numpy()


def _agree(ours: np.ndarray, theirs: np.ndarray, what: str) -> np.ndarray:
    """The reference, after checking that bnlab.core and torch agree on it (float64)."""
    if not np.allclose(ours, theirs, rtol=1e-10, atol=1e-10):
        raise RuntimeError(f"internal error: bnlab.core and torch disagree on {what}")
    return ours


def _normalise(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, *,
    axes: tuple[int, ...], unbiased: bool = False, eps_mode: str = "inside",
    affine: str = "yes", mean: np.ndarray | None = None, var: np.ndarray | None = None,
) -> np.ndarray:
    """Batch norm and its usual mistakes, written out directly (channels on axis 1)."""
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    if mean is None or var is None:
        n = int(np.prod([x.shape[a] for a in axes]))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        if unbiased:
            var = var * n / (n - 1) if n > 1 else var * np.nan
    else:
        mean, var = mean.reshape(shape), var.reshape(shape)
    denom = {"inside": np.sqrt(var + eps), "none": np.sqrt(var),
             "outside": np.sqrt(var) + eps}[eps_mode]
    xhat = (x - mean) / denom
    g, b = gamma.reshape(shape), beta.reshape(shape)
    return {"yes": g * xhat + b, "no": xhat, "swapped": b * xhat + g}[affine]


_FORWARD_FLAGS: dict[str, dict[Any, str]] = {
    "unbiased": {True: UNBIASED_NORMALISE},
    "eps_mode": {
        "none": "eps is missing: divide by sqrt(var + eps), not sqrt(var) (a constant "
                "feature would divide by zero)",
        "outside": "eps is outside the square root: divide by sqrt(var + eps), not "
                   "sqrt(var) + eps",
    },
    "affine": {
        "no": "gamma and beta are not applied: out = gamma · x̂ + beta",
        "swapped": "gamma and beta are swapped: out = gamma · x̂ + beta (gamma scales)",
    },
}
_DEFAULTS: dict[str, Any] = {"unbiased": False, "eps_mode": "inside", "affine": "yes"}


def _flag_variants(axes_options: dict[Any, str | None]) -> list[_Diagnosis]:
    """Every combination of the forward mistakes, fewest mistakes first."""
    options: list[list[tuple[str, Any, str | None]]] = [
        [(flag, _DEFAULTS[flag], None)] + [(flag, v, m) for v, m in choices.items()]
        for flag, choices in _FORWARD_FLAGS.items()
    ]
    options.append([("axes", a, m) for a, m in axes_options.items()])
    out: list[tuple[int, _Diagnosis]] = []
    for combo in itertools.product(*options):
        messages = tuple(m for _, _, m in combo if m is not None)
        if not messages:
            continue
        kw = {flag: v for flag, v, _ in combo}
        axes = kw.pop("axes")

        def compute(c: Case, kw: dict[str, Any] = kw, axes: Any = axes) -> np.ndarray:
            if axes == "reshape":
                return _reshape_bug(c, **kw)
            return _normalise(c["x"], c["gamma"], c["beta"], float(c["eps"]), axes=axes, **kw)

        out.append((len(messages), _Diagnosis(messages, compute)))
    return [d for _, d in sorted(out, key=lambda t: t[0])]


def _reshape_bug(c: Case, **kw: Any) -> np.ndarray:
    """(N, C, H, W) reshaped to (−1, C) without moving C last first: channels get mixed."""
    x = c["x"]
    flat = x.reshape(-1, x.shape[1])
    return _normalise(flat, c["gamma"], c["beta"], float(c["eps"]), axes=(0,), **kw).reshape(
        x.shape)


def _describe_x(c: Case) -> str:
    return f"x of shape {tuple(c['x'].shape)}, eps={float(c['eps']):g}"


# ---------------------------------------------------------------------- cases


def _features(rng: np.random.Generator, n: int, d: int, tiny: bool = False) -> np.ndarray:
    loc = rng.uniform(-3.0, 3.0, d)
    scale = rng.uniform(0.5, 3.0, d)
    if tiny:
        scale[0] = 1e-3  # var ~ 1e-6, below eps: shows where eps goes
    return rng.normal(loc, scale, size=(n, d))


def _affine(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.5, 2.0, d) * rng.choice([-1.0, 1.0], d), rng.normal(0.0, 1.0, d)


_SIZES = [(2, 3), (3, 1), (4, 5), (8, 2), (16, 7), (32, 4)]


def _forward_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for i, (n, d) in enumerate(_SIZES):
        gamma, beta = _affine(rng, d)
        eps = [1e-5, 1e-3, 1e-1][i % 3]
        cases.append({"x": _features(rng, n, d, tiny=i == 3), "gamma": gamma, "beta": beta,
                      "eps": np.array(1e-5 if i == 3 else eps)})
    return cases


def _grade_forward(cases: list[Case], out: list[Outputs]) -> tuple[list[str], float]:
    expected = [
        _agree(_core_forward(c["x"], c["gamma"], c["beta"], float(c["eps"])),
               _torch_forward(c["x"], c["gamma"], c["beta"], float(c["eps"])), "forward")
        for c in cases
    ]
    per_sample = ("you normalised each sample over its features (axis 1, like LayerNorm): "
                  "batch norm takes one mean and variance per feature over the batch (axis 0)")
    variants = _flag_variants({(0,): None, (1,): per_sample})
    return _diagnose("out", cases, [o["out"] for o in out], expected, variants, _describe_x)


def _spatial_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for i, (n, c, h, w) in enumerate([(2, 3, 4, 5), (4, 2, 3, 3), (3, 4, 2, 1), (8, 1, 5, 4)]):
        loc = rng.uniform(-3.0, 3.0, (1, c, 1, 1))
        scale = rng.uniform(0.5, 3.0, (1, c, 1, 1))
        gamma, beta = _affine(rng, c)
        cases.append({"x": rng.normal(loc, scale, size=(n, c, h, w)), "gamma": gamma,
                      "beta": beta, "eps": np.array([1e-5, 1e-3, 1e-1, 1e-5][i])})
    return cases


def _grade_spatial(cases: list[Case], out: list[Outputs]) -> tuple[list[str], float]:
    expected = [
        _agree(_core_forward(c["x"], c["gamma"], c["beta"], float(c["eps"])),
               _torch_forward(c["x"], c["gamma"], c["beta"], float(c["eps"])), "spatial")
        for c in cases
    ]
    axes: dict[Any, str | None] = {
        (0, 2, 3): None,
        (0,): "you normalised every (channel, row, column) position separately over the "
              "batch: spatial BN shares one mean and variance per channel over N, H and W",
        (1, 2, 3): "you normalised each sample over all its values (like LayerNorm): spatial "
                   "BN takes statistics per channel over N, H and W",
        (2, 3): "you normalised each image's channel over H and W only (InstanceNorm): "
                "spatial BN also pools over the batch N",
        (0, 1, 2, 3): "you normalised with one mean and variance for the whole tensor: "
                      "spatial BN takes one per channel",
        "reshape": "you reshaped (N, C, H, W) to (−1, C) without moving C last first, which "
                   "mixes channels: transpose to (N, H, W, C) before reshaping (and back after)",
    }
    variants = _flag_variants(axes)
    return _diagnose("out", cases, [o["out"] for o in out], expected, variants, _describe_x)


def _running_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for i, (n, d) in enumerate(_SIZES[:5]):
        # Running statistics well away from 0 and 1, so that every convention differs.
        cases.append({
            "x": _features(rng, n, d),
            "running_mean": rng.uniform(-2.0, 2.0, d),
            "running_var": rng.uniform(0.2, 3.0, d),
            "momentum": np.array([0.1, 0.01, 0.3, 0.9, 0.2][i]),
        })
    return cases


def _torch_running(c: Case) -> tuple[np.ndarray, np.ndarray]:
    torch = _torch()
    rm, rv = torch.from_numpy(c["running_mean"].copy()), torch.from_numpy(c["running_var"].copy())
    torch.nn.functional.batch_norm(torch.from_numpy(c["x"]), rm, rv, training=True,
                                   momentum=float(c["momentum"]))
    return rm.numpy(), rv.numpy()


def _core_running(c: Case) -> tuple[np.ndarray, np.ndarray]:
    _, cache = F.batch_norm_forward(c["x"], None, None, eps=1e-5, training=True)
    return F.update_running_stats(c["running_mean"], c["running_var"], cache.mean,
                                  cache.var_unbiased, float(c["momentum"]))


def _running_variant(
    c: Case, *, unbiased: bool = True, opposite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    x, m = c["x"], float(c["momentum"])
    n = x.shape[0]
    mean, var = x.mean(axis=0), x.var(axis=0) * (n / (n - 1) if unbiased else 1.0)
    share = 1.0 - m if opposite else m
    return (share * mean + (1 - share) * c["running_mean"],
            share * var + (1 - share) * c["running_var"])


def _running_part(c: Case, /, *, k: int, **mistakes: bool) -> np.ndarray:
    return _running_variant(c, **mistakes)[k]


def _running_mistakes(n: int) -> list[tuple[dict[str, bool], tuple[str, ...]]]:
    """(flags for :func:`_running_variant`, their messages), one mistake before two."""
    return [
        ({"opposite": True}, (OPPOSITE_MOMENTUM,)),
        ({"unbiased": False}, (biased_running_var_message(n),)),
        ({"opposite": True, "unbiased": False},
         (OPPOSITE_MOMENTUM, biased_running_var_message(n))),
    ]


def _grade_running(cases: list[Case], out: list[Outputs]) -> tuple[list[str], float]:
    problems: list[str] = []
    first = out[0]
    d = cases[0]["x"].shape[1]
    init_mean, init_var = first["init_mean"], first["init_var"]
    if init_var.shape == (d,) and np.all(init_var == 0):
        problems.append(f"init_running_stats: {RUNNING_VAR_ZERO}")
    elif not (init_var.shape == (d,) and np.all(init_var == 1)):
        problems.append(f"init_running_stats: running_var must be ones of shape ({d},), as in "
                        f"torch.nn.BatchNorm1d; got {np.array2string(init_var, precision=3)}")
    if not (init_mean.shape == (d,) and np.all(init_mean == 0)):
        problems.append(f"init_running_stats: running_mean must be zeros of shape ({d},), as "
                        f"in torch.nn.BatchNorm1d; got {np.array2string(init_mean, precision=3)}")
    refs = [(_agree(a[0], b[0], "running_mean"), _agree(a[1], b[1], "running_var"))
            for a, b in ((_core_running(c), _torch_running(c)) for c in cases)]

    def describe(c: Case) -> str:
        return f"x of shape {tuple(c['x'].shape)}, momentum={float(c['momentum']):g}"

    worst = 0.0
    for k, name in ((0, "new_running_mean"), (1, "new_running_var")):
        n = int(cases[0]["x"].shape[0])
        variants = [
            _Diagnosis(msgs, partial(_running_part, k=k, **kw))
            for kw, msgs in _running_mistakes(n)
        ]
        key = "new_mean" if k == 0 else "new_var"
        found, w = _diagnose(name, cases, [o[key] for o in out], [r[k] for r in refs],
                             variants, describe)
        problems += found
        worst = max(worst, w)
    return _dedupe(problems), worst


def _dedupe(problems: list[str]) -> list[str]:
    """One line per mistake: the mean and the variance often show the same one."""
    seen: list[str] = []
    out = []
    for p in problems:
        body = p.split(": ", 1)[1].rsplit(" [", 1)[0] if ": " in p else p
        if body not in seen:
            seen.append(body)
            out.append(p)
    return out


# ---------------------------------------------------------------------- inference


def _inference_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for i, (n, d) in enumerate([(4, 3), (8, 5), (16, 2)]):
        gamma, beta = _affine(rng, d)
        case: Case = {"gamma": gamma, "beta": beta, "eps": np.array([1e-5, 1e-3, 1e-5][i]),
                      "momentum": np.array([0.1, 0.2, 0.05][i]), "steps": np.array(3)}
        for t in range(3):
            case[f"x{t}"] = _features(rng, n, d)
        # The eval batch comes from elsewhere, so its statistics differ from the running ones.
        case["x_eval"] = _features(rng, n, d) * 2.0 + 1.0
        cases.append(case)
    return cases


def _torch_sequence(c: Case) -> Outputs:
    torch = _torch()
    d = c["gamma"].shape[0]
    bn = torch.nn.BatchNorm1d(d, eps=float(c["eps"]), momentum=float(c["momentum"]),
                              dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(c["gamma"]))
        bn.bias.copy_(torch.from_numpy(c["beta"]))
        out: Outputs = {}
        for t in range(int(c["steps"])):
            out[f"y{t}"] = bn(torch.from_numpy(c[f"x{t}"])).numpy()
            out[f"mean{t}"], out[f"var{t}"] = bn.running_mean.numpy().copy(), \
                bn.running_var.numpy().copy()
        bn.eval()
        out["y_eval"] = bn(torch.from_numpy(c["x_eval"])).numpy()
    return out


def _core_sequence(c: Case) -> Outputs:
    d = c["gamma"].shape[0]
    rm, rv = np.zeros(d), np.ones(d)
    out: Outputs = {}
    for t in range(int(c["steps"])):
        out[f"y{t}"], cache = F.batch_norm_forward(c[f"x{t}"], c["gamma"], c["beta"],
                                                   eps=float(c["eps"]), training=True)
        rm, rv = F.update_running_stats(rm, rv, cache.mean, cache.var_unbiased,
                                        float(c["momentum"]))
        out[f"mean{t}"], out[f"var{t}"] = rm, rv
    out["y_eval"], _ = F.batch_norm_forward(c["x_eval"], c["gamma"], c["beta"],
                                            eps=float(c["eps"]), training=False,
                                            running_mean=rm, running_var=rv)
    return out


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays stacked (one per step); the first alone when their shapes differ."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    return arrays[0]


def _replay(c: Case, /, *, k: int, **mistakes: bool) -> np.ndarray:
    """running_mean (k=0) or running_var (k=1) after each step, from the learner's start."""
    state = {"running_mean": c["init_mean"], "running_var": c["init_var"]}
    seq = []
    for t in range(int(c["steps"])):
        new = _running_variant({"x": c[f"x{t}"], "momentum": c["momentum"], **state},
                               **mistakes)
        state = {"running_mean": new[0], "running_var": new[1]}
        seq.append(new[k])
    return np.stack(seq)


def _grade_inference(cases: list[Case], out: list[Outputs]) -> tuple[list[str], float]:
    problems: list[str] = []
    steps = int(cases[0]["steps"])
    refs = []
    for c in cases:
        ours, theirs = _core_sequence(c), _torch_sequence(c)
        refs.append({k: _agree(v, theirs[k], f"inference {k}") for k, v in ours.items()})
    worst = 0.0

    first, d = out[0], cases[0]["gamma"].shape[0]
    if first["init_var"].shape == (d,) and np.all(first["init_var"] == 0):
        problems.append(f"__init__: {RUNNING_VAR_ZERO}")
    elif not (first["init_var"].shape == (d,) and np.all(first["init_var"] == 1)):
        problems.append(f"__init__: running_var must start as ones of shape ({d},)")
    if not (first["init_mean"].shape == (d,) and np.all(first["init_mean"] == 0)):
        problems.append(f"__init__: running_mean must start as zeros of shape ({d},)")
    if not bool(first["training_init"]):
        problems.append("__init__: a new layer must be in training mode (self.training = True), "
                        "as torch's modules are")

    def step_case(c: Case, t: int) -> Case:
        return {"x": c[f"x{t}"], "gamma": c["gamma"], "beta": c["beta"], "eps": c["eps"]}

    # Training outputs: the forward exercise's diagnosis, on every step.
    step_cases = [step_case(c, t) for c in cases for t in range(steps)]
    found, w = _diagnose(
        "training output", step_cases, [o[f"y{t}"] for o in out for t in range(steps)],
        [r[f"y{t}"] for r in refs for t in range(steps)],
        _flag_variants({(0,): None}), _describe_x)
    problems += found
    worst = max(worst, w)

    # Running statistics: replayed from the learner's own starting values, so that a wrong
    # initial value is reported once (above) and not again as a wrong update.
    replay_cases = [{**c, "init_mean": o["init_mean"], "init_var": o["init_var"]}
                    for c, o in zip(cases, out, strict=True)]
    for k, key in ((0, "mean"), (1, "var")):
        yours = [_stacked([o[f"{key}{t}"] for t in range(steps)]) for o in out]
        variants = [
            _Diagnosis(msgs, partial(_replay, k=k, **kw))
            for kw, msgs in _running_mistakes(int(cases[0]["x0"].shape[0]))
        ]
        found, w = _diagnose(f"running_{key}", replay_cases, yours,
                             [_replay(c, k=k) for c in replay_cases], variants,
                             lambda c: f"batches of shape {tuple(c['x0'].shape)}, "
                                       f"momentum={float(c['momentum']):g}",
                             against="the right updates replayed from your initial values")
        problems += found
        worst = max(worst, w)

    # Eval: normalised with the learner's own running statistics, which must not change.
    last = steps - 1
    for i, (c, o) in enumerate(zip(cases, out, strict=True)):
        rm, rv = o[f"mean{last}"], o[f"var{last}"]
        if rm.shape != c["gamma"].shape or rv.shape != rm.shape:
            break  # already reported as a running-statistics problem
        g, b, eps = c["gamma"], c["beta"], float(c["eps"])
        with np.errstate(all="ignore"):
            expected = _normalise(c["x_eval"], g, b, eps, axes=(0,), mean=rm, var=rv)
            batch = [_normalise(c["x_eval"], g, b, eps, axes=(0,), unbiased=u)
                     for u in (False, True)]
        changed = not (np.array_equal(o["mean_eval"], rm) and np.array_equal(o["var_eval"], rv))
        worst = max(worst, _diff(o["y_eval"], expected))
        where = f"[case {i + 1}: batches of shape {tuple(c['x0'].shape)}]"
        if _close(o["y_eval"], expected):
            if changed:
                problems.append(f"eval: the eval call changed running_mean/running_var: "
                                f"inference must not update them {where}")
            elif bool(o["training_eval"]):
                problems.append("eval: self.training is still True after eval(): set it to "
                                f"False there {where}")
            else:
                continue
        elif any(_close(o["y_eval"], bv) for bv in batch):
            message = (TRAINING_NEVER_OFF if changed or bool(o["training_eval"])
                       else BATCH_STATS_AT_INFERENCE)
            problems.append(f"eval output: {message} {where}")
        else:
            shape = _shape_problem("eval output", o["y_eval"], expected)
            problems.append(shape or f"eval output differs from normalising with your "
                            f"running statistics by up to {_diff(o['y_eval'], expected):.3g} "
                            f"(relative) {where}")
        break
    return _dedupe(problems), worst


# ---------------------------------------------------------------------- backward


def _backward_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for i, (n, d) in enumerate(_SIZES):
        gamma, _ = _affine(rng, d)
        cases.append({"x": _features(rng, n, d), "gamma": gamma,
                      "dout": rng.normal(0.0, 1.0, (n, d)),
                      "eps": np.array([1e-5, 1e-3, 1e-1][i % 3])})
    return cases


def _torch_grads(c: Case, *, detach_mean: bool = False, detach_var: bool = False,
                 unbiased: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autograd of batch norm (or of one of the usual mistakes) in float64."""
    torch = _torch()
    x = torch.from_numpy(c["x"].copy()).requires_grad_(True)
    g = torch.from_numpy(c["gamma"].copy()).requires_grad_(True)
    b = torch.zeros_like(g, requires_grad=True)
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0) * (x.shape[0] / (x.shape[0] - 1) if unbiased else 1.0)
    if detach_mean:
        mean = mean.detach()
        var = ((x - mean) ** 2).mean(0) * (x.shape[0] / (x.shape[0] - 1) if unbiased else 1.0)
    if detach_var:
        var = var.detach()
    y = g * (x - mean) / torch.sqrt(var + float(c["eps"])) + b
    y.backward(torch.from_numpy(c["dout"]))
    assert x.grad is not None and g.grad is not None and b.grad is not None
    return x.grad.numpy(), g.grad.numpy(), b.grad.numpy()


def _grad_part(c: Case, /, *, k: int, **mistakes: bool) -> np.ndarray:
    return _torch_grads(c, **mistakes)[k]


def _core_grads(c: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, cache = F.batch_norm_forward(c["x"], c["gamma"], np.zeros_like(c["gamma"]),
                                    eps=float(c["eps"]), training=True)
    dx, dg, db = F.batch_norm_backward(c["dout"], cache)
    assert dg is not None and db is not None
    return dx, dg, db


_CONSTANT_STATS = (
    "your dx treats the batch mean and variance as constants (dx = gamma · dout / "
    "sqrt(var + eps)): that is the gradient in eval mode. In training both depend on x: "
    "dx = gamma / sqrt(var + eps) · (dout − mean(dout) − x̂ · mean(dout · x̂))"
)
_NO_MEAN_PATH = ("your dx misses the path through the batch mean: the term −mean(dout) "
                 "inside dx = gamma / sqrt(var + eps) · (dout − mean(dout) − x̂ · mean(dout · x̂))")
_NO_VAR_PATH = ("your dx misses the path through the batch variance: the term "
                "−x̂ · mean(dout · x̂) inside dx = gamma / sqrt(var + eps) · (dout − mean(dout) "
                "− x̂ · mean(dout · x̂))")
_UNBIASED_GRADS = ("these are the gradients of a forward pass that normalises with the "
                   "unbiased variance (÷ (n−1)): batch norm's forward uses the biased one (÷ n)")


def _grade_backward(cases: list[Case], out: list[Outputs]) -> tuple[list[str], float]:
    refs = []
    for c in cases:
        ours, theirs = _core_grads(c), _torch_grads(c)
        refs.append(tuple(_agree(a, b, "backward") for a, b in zip(ours, theirs, strict=True)))
    problems: list[str] = []
    worst = 0.0

    def describe(c: Case) -> str:
        return _describe_x(c)

    grad_variants: list[tuple[dict[str, bool], str]] = [
        ({"detach_mean": True, "detach_var": True}, _CONSTANT_STATS),
        ({"detach_mean": True}, _NO_MEAN_PATH),
        ({"detach_var": True}, _NO_VAR_PATH),
        ({"unbiased": True}, _UNBIASED_GRADS),
    ]
    for k, name in enumerate(("dx", "dgamma", "dbeta")):
        variants = [_Diagnosis((m,), partial(_grad_part, k=k, **kw))
                    for kw, m in grad_variants]
        if k == 1:
            variants.insert(0, _Diagnosis(
                ("dgamma and dbeta are swapped: dbeta = Σ dout, dgamma = Σ dout · x̂",),
                lambda c: c["dout"].sum(axis=0)))
        if k == 2:
            variants.insert(0, _Diagnosis(
                ("dgamma and dbeta are swapped: dbeta = Σ dout, dgamma = Σ dout · x̂",),
                lambda c: _core_grads(c)[1]))
        yours = [o[name] for o in out]
        if k > 0 and any(y.shape == c["x"].shape for y, c in zip(yours, cases, strict=True)):
            problems.append(f"{name} has shape (N, D): sum it over the batch (axis 0), "
                            f"one value per feature")
            continue
        found, w = _diagnose(name, cases, yours, [r[k] for r in refs], variants, describe)
        problems += found
        worst = max(worst, w)
    return _dedupe(problems), worst


# ---------------------------------------------------------------------- the exercises


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the learner writes, how cases are drawn, how answers are graded."""

    name: str
    title: str
    task: str
    make_cases: Callable[[np.random.Generator], list[Case]]
    grade: Callable[[list[Case], list[Outputs]], tuple[list[str], float]]

    @property
    def defines(self) -> tuple[str, ...]:
        return _child.REQUIRED[self.name]


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in (
        Exercise("forward", "the forward pass in training mode",
                 "batchnorm_forward(x, gamma, beta, eps) -> out, x of shape (N, D)",
                 _forward_cases, _grade_forward),
        Exercise("running", "the running statistics",
                 "init_running_stats(D), update_running_stats(mean, var, x, momentum)",
                 _running_cases, _grade_running),
        Exercise("inference", "a layer with train() and eval()",
                 "class BatchNorm1d: __call__, train(), eval(), running statistics",
                 _inference_cases, _grade_inference),
        Exercise("backward", "the backward pass, step by step",
                 "batchnorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)",
                 _backward_cases, _grade_backward),
        Exercise("backward_alt", "the simplified backward pass",
                 "batchnorm_backward_alt(dout, x, gamma, eps), dx in one expression",
                 _backward_cases, _grade_backward),
        Exercise("spatial", "spatial (2-D) batch norm",
                 "spatial_batchnorm_forward(x, gamma, beta, eps), x: (N, C, H, W)",
                 _spatial_cases, _grade_spatial),
    )
}

MARKER = "# bnlab exercise:"


def get_exercise(name: str) -> Exercise:
    if name not in EXERCISES:
        raise BnlabError(f"unknown exercise {name!r}; expected one of: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def exercise_of_file(path: Path) -> str:
    """The NAME in the file's ``# bnlab exercise: NAME`` line."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[:30]:
        if line.strip().startswith(MARKER):
            return line.split(":", 1)[1].strip()
    raise BnlabError(f"{path}: no '{MARKER} NAME' line in its first 30 lines; start from "
                     f"'bnlab learn start NAME' or pass --exercise NAME")


@dataclass
class Grade:
    """The result of :func:`check_file`."""

    exercise: str
    passed: bool
    seed: int
    cases: int
    problems: list[str] = field(default_factory=list)
    max_diff: float = float("nan")  # worst relative difference from the reference
    seconds: float = 0.0

    def format(self) -> str:
        ex = EXERCISES[self.exercise]
        head = f"{self.exercise}: {ex.title} ({self.cases} randomized cases, seed {self.seed})"
        if self.passed:
            return (f"PASS {head}\n  matches bnlab.core and torch to {self.max_diff:.1e} "
                    f"(relative; tolerance {TOL:g}) in {self.seconds:.1f} s")
        lines = [f"FAIL {head}"] + [
            textwrap.fill(p, width=84, initial_indent="  - ", subsequent_indent="    ",
                          break_on_hyphens=False, break_long_words=False)
            for p in self.problems
        ]
        lines.append(f"  rerun with --seed {self.seed} to get the same cases")
        return "\n".join(lines)


def check_file(
    path: str | os.PathLike[str],
    *,
    exercise: str | None = None,
    seed: int | None = None,
    timeout: float = 10.0,
) -> Grade:
    """Run the learner's ``path`` in a child process and grade what it returns.

    Raises :class:`BnlabError` for a path that is not a readable file or an unknown
    exercise; everything the learner's code does wrong (a syntax error, a missing name,
    an exception, a timeout, a wrong answer) is a failing :class:`Grade`.
    """
    start = time.perf_counter()
    p = Path(path)
    if not p.is_file():
        raise BnlabError(f"{p}: no such file (expected a .py file from 'bnlab learn start')")
    name = exercise if exercise is not None else exercise_of_file(p)
    ex = get_exercise(name)
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    cases = ex.make_cases(np.random.default_rng(seed))
    grade = Grade(name, False, seed, len(cases))
    outputs, problem = _run_child(ex, p, cases, timeout)
    if problem is not None:
        grade.problems = [problem]
    else:
        grade.problems, grade.max_diff = ex.grade(cases, outputs)
        grade.passed = not grade.problems
    grade.seconds = time.perf_counter() - start
    return grade


def _run_child(
    ex: Exercise, path: Path, cases: list[Case], timeout: float,
) -> tuple[list[Outputs], str | None]:
    with tempfile.TemporaryDirectory(prefix="bnlab-learn-") as tmp:
        inputs, outputs, result = (Path(tmp) / n for n in ("in.npz", "out.npz", "result.json"))
        arrays = {f"c{i}_{k}": v for i, c in enumerate(cases) for k, v in c.items()}
        arrays["count"] = np.array(len(cases))
        np.savez(inputs, **arrays)  # type: ignore[arg-type]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", _child.__file__, ex.name, str(path.resolve()),
               str(inputs), str(outputs), str(result)]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            _torch()  # import torch for the references while the learner's code runs
            left = max(timeout - (time.monotonic() - start), 0.1)
            stdout, stderr = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return [], (f"your code did not finish within {timeout:g} s (an endless loop? "
                        f"the cases are small: N ≤ 32)")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not result.is_file():
            tail = (stderr or stdout).strip().splitlines()[-3:]
            return [], (f"your file ended the grading process (exit code {proc.returncode})"
                        + (": " + " | ".join(tail) if tail else ""))
        verdict = json.loads(result.read_text(encoding="utf-8"))
        if not verdict["ok"]:
            return [], str(verdict["message"])
        with np.load(outputs, allow_pickle=False) as data:
            flat = dict(data)
    per_case = [
        {k.split("_", 1)[1]: v for k, v in flat.items() if k.startswith(f"c{i}_")}
        for i in range(len(cases))
    ]
    return per_case, None
