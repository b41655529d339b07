"""bnlab.core.BatchNorm1d/2d/3d against torch (the oracle), identities and bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab.core as core
from bnlab.core import functional as F
from bnlab.verify import Case, default_cases, gradcheck, gradcheck_cases, run_case

CLASSES = {1: core.BatchNorm1d, 2: core.BatchNorm2d, 3: core.BatchNorm3d}


def check_against_torch(case: Case, seed: int = 0) -> None:
    """Our layer and torch's on the same inputs: every output, gradient and buffer agree."""
    result = run_case(case, seed)
    assert result.ok, f"{case.id}: {result.failures}"


@pytest.mark.parametrize("case", default_cases(), ids=lambda c: c.id)
def test_matches_torch_case_table(case: Case) -> None:
    check_against_torch(case)


@settings(max_examples=25, deadline=None)
@given(
    dims=st.integers(1, 3),
    n=st.integers(2, 6),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    length=st.integers(0, 3),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, None, 1.0, 0.0, 0.37]),
    dtype=st.sampled_from(["float32", "float64"]),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),  # torch refuses eps=0 in training
    seed=st.integers(0, 2**16),
)
def test_matches_torch_generated(
    dims: int, n: int, c: int, spatial: list[int], length: int, affine: bool, track: bool,
    momentum: float | None, dtype: str, eps: float, seed: int,
) -> None:
    if dims == 1:
        shape: tuple[int, ...] = (n, c) if length == 0 else (n, c, length)
    else:
        shape = (n, c, *spatial[:dims])
    kwargs = {"affine": affine, "track_running_stats": track, "momentum": momentum, "eps": eps}
    check_against_torch(Case(f"BatchNorm{dims}d", shape, dtype, kwargs, steps=2), seed)


@pytest.mark.parametrize(("cls", "shape", "affine", "training"), gradcheck_cases())
def test_finite_difference_gradients(
    cls: str, shape: tuple[int, ...], affine: bool, training: bool
) -> None:
    assert gradcheck(cls, shape, affine=affine, training=training) < 1e-6


def test_large_offset_float32_at_least_as_accurate_as_torch() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(1e4, 1e-2, (32, 8, 12, 12)).astype(np.float32)
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x).double(), None, None,
                                         training=True).numpy()
    theirs = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                            training=True).numpy()
    ours = core.BatchNorm2d(8, affine=False, track_running_stats=False)(x)
    err_ours, err_torch = np.abs(ours - ref).max(), np.abs(theirs - ref).max()
    assert err_ours <= err_torch
    assert err_ours < 1e-5  # the naive E[x²] − E[x]² would give errors of order 1


def test_float16_input_computes_in_float32_and_returns_float16() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, (16, 4, 5, 5)).astype(np.float16)
    bn = core.BatchNorm2d(4)
    y = bn(x)
    assert y.dtype == np.float16
    assert bn.running_mean.dtype == np.float32
    expected = core.BatchNorm2d(4)(x.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(y, expected)
    assert bn.backward(np.ones_like(y)).dtype == np.float16


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("track", [True, False])
def test_eval_never_changes_state(dims: int, track: bool) -> None:
    rng = np.random.default_rng(1)
    shape = (4, 3) if dims == 1 else (4, 3, *[2] * dims)
    bn = CLASSES[dims](3, momentum=None, track_running_stats=track)
    bn(rng.normal(size=shape))  # one training step so the buffers are not the defaults
    bn.eval()
    before = copy.deepcopy(bn.state_dict())
    weight, bias = bn.weight.copy(), bn.bias.copy()
    for _ in range(3):
        bn(rng.normal(size=shape))
        bn.backward(rng.normal(size=shape))
    after = bn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(bn.weight, weight)
    np.testing.assert_array_equal(bn.bias, bias)
    assert bn.training is False


def test_num_batches_tracked_counts_training_steps_only() -> None:
    bn = core.BatchNorm1d(2)
    x = np.random.default_rng(0).normal(size=(5, 2))
    for _ in range(3):
        bn(x)
    bn.eval()(x)
    assert bn.num_batches_tracked == 3
    assert core.BatchNorm1d(2, track_running_stats=False).num_batches_tracked is None


def test_momentum_none_is_the_cumulative_average() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(i, 1.0 + i, (10, 3)) for i in range(4)]
    bn = core.BatchNorm1d(3, momentum=None, dtype=np.float64)
    for b in batches:
        bn(b)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-14)
    # The first step replaces the initial buffers entirely (factor 1/1).
    np.testing.assert_allclose(bn.running_var, np.mean([b.var(0, ddof=1) for b in batches], 0),
                               rtol=1e-14)


def test_state_dict_round_trips_with_torch() -> None:
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2) * 3 + 1)
    theirs.weight.data.uniform_(0.5, 1.5)
    ours = core.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    assert ours.num_batches_tracked == 1
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.numpy())
    ours(np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v)


def test_nan_and_inf_propagate_like_torch() -> None:
    x = np.random.default_rng(0).normal(size=(6, 3, 2)).astype(np.float32)
    x[0, 0, 0] = np.nan
    x[1, 1, 1] = np.inf
    layer = core.BatchNorm1d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent, like torch: no NumPy RuntimeWarning
        ours = layer(x)
        layer.backward(np.ones_like(x))
        layer.eval()
        layer(x)
    theirs = torch.nn.BatchNorm1d(3)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_functional_forward_is_pure() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5))
    w, b, rm, rv = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3), rng.random(3) + 1
    copies = [a.copy() for a in (x, w, b, rm, rv)]
    for training in (True, False):
        F.batch_norm_forward(x, w, b, eps=1e-5, training=training, running_mean=rm,
                             running_var=rv)
    for a, c in zip((x, w, b, rm, rv), copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_update_running_stats_follows_torch_convention() -> None:
    mean, var = F.update_running_stats(np.zeros(2), np.ones(2), np.array([1.0, 2.0]),
                                       np.array([3.0, 5.0]), 0.1)
    np.testing.assert_allclose(mean, [0.1, 0.2], rtol=1e-15)
    np.testing.assert_allclose(var, [0.9 + 0.3, 0.9 + 0.5], rtol=1e-15)


def test_threads_do_not_change_results() -> None:
    x = np.random.default_rng(0).normal(size=(64, 16, 20, 20)).astype(np.float32)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    previous = core.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            core.set_num_threads(n)
            bn = core.BatchNorm2d(16)
            results.append((bn(x), bn.backward(dy), bn.running_var.copy()))
    finally:
        core.set_num_threads(previous)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad input


def _state(bn: core.BatchNorm2d) -> dict[str, np.ndarray]:
    return copy.deepcopy(bn.state_dict())


def _assert_unchanged(bn: core.BatchNorm2d, before: dict[str, np.ndarray]) -> None:
    after = bn.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.ones((1, 3, 1, 1), np.float32), ValueError, "more than 1 value per channel"),
        (np.ones((4, 3, 2), np.float32), ValueError, "expected 4D input"),
        (np.ones((4, 5, 2, 2), np.float32), ValueError, "expected 3 channels"),
        (np.ones((4, 3, 2, 2), np.int64), TypeError, "floating-point"),
        (np.full((4, 3, 2, 2), "a"), TypeError, "floating-point"),
        (np.ones((4, 3, 2, 2), np.complex64), TypeError, "floating-point"),
    ],
    ids=["one-value-per-channel", "wrong-rank", "channels", "integer", "string", "complex"],
)
def test_bad_input_raises_and_changes_nothing(x: np.ndarray, error: type, match: str) -> None:
    bn = core.BatchNorm2d(3)
    bn(np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32))
    before = _state(bn)
    with pytest.raises(error, match=match):
        bn(x)
    _assert_unchanged(bn, before)


def test_one_value_per_channel_hint_and_eval_works() -> None:
    bn = core.BatchNorm1d(4)
    with pytest.raises(ValueError, match=r"drop the last incomplete batch.*eval"):
        bn(np.ones((1, 4), np.float32))
    assert bn.num_batches_tracked == 0
    assert bn.eval()(np.ones((1, 4), np.float32)).shape == (1, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features must be > 0"),
        ({"num_features": -2}, "num_features must be > 0"),
        ({"num_features": 3, "eps": -1e-5}, "eps must be >= 0"),
        ({"num_features": 3, "momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"num_features": 3, "momentum": -0.1}, r"momentum must be in \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        core.BatchNorm2d(**kwargs)  # type: ignore[arg-type]


def test_backward_before_forward_and_wrong_dy_shape() -> None:
    bn = core.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.ones((4, 3, 2, 2), np.float32))
    bn(np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32))
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input"):
        bn.backward(np.ones((4, 3, 2, 3), np.float32))
    assert bn.grads == {}
    dx = bn.backward(np.ones((4, 3, 2, 2), np.float32))  # the bad dy spent nothing
    assert dx.shape == (4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="already called for this forward"):
        bn.backward(np.ones((4, 3, 2, 2), np.float32))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s: s.pop("running_var"), ValueError, r"missing keys \['running_var'\]"),
        (lambda s: s.update(extra=np.ones(3)), ValueError, r"unexpected keys \['extra'\]"),
        (lambda s: s.update(weight=np.ones(4)), ValueError, r"'weight' has shape \(4,\)"),
        (lambda s: s.update(bias=np.array(["x"] * 3)), TypeError, "numeric"),
    ],
    ids=["missing", "unexpected", "shape", "non-numeric"],
)
def test_bad_state_dict_is_refused_and_changes_nothing(mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    bn = core.BatchNorm2d(3)
    bn(np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32))
    before = _state(bn)
    bad = {k: np.full_like(v, 7) for k, v in before.items()}
    mutate(bad)
    with pytest.raises(error, match=match):
        bn.load_state_dict(bad)
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_input_matches_torch_and_keeps_its_layout(training: bool) -> None:
    rng = np.random.default_rng(4)
    x = np.moveaxis(rng.normal(3, 2, (6, 5, 4, 7)), -1, 1)  # NHWC memory seen as NCHW
    dy = np.moveaxis(rng.normal(size=(6, 5, 4, 7)), -1, 1)
    ours = core.BatchNorm2d(7, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(7).double()
    ours(x)  # one training step first, so eval has statistics to use
    theirs(torch.from_numpy(x))
    ours.train(training)
    theirs.train(training)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = theirs(tx)
    ty.backward(torch.from_numpy(dy))
    y = ours(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-13)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous


def test_sorted_batch_whose_first_samples_are_far_from_the_mean() -> None:
    """The shift comes from the first samples; when they are far off, the core re-centres."""
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1e-3, (4096, 1024)).astype(np.float32)  # shift: first 128 rows
    x[:128] += 1e3  # sorted: an outlying group first, so the shift is far from the mean
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x).double(), None, None,
                                         training=True).numpy()
    theirs = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                            training=True).numpy()
    bn = core.BatchNorm1d(1024, affine=False, dtype=np.float64)
    ours = bn(x)
    assert np.abs(ours - ref).max() <= 4 * max(np.abs(theirs - ref).max(), 1e-7)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * x.astype(np.float64).var(0, ddof=1),
                               rtol=1e-6)


def test_functional_forward_accepted_nan_eps() -> None:
    """eps=NaN slipped past an `eps < 0` check and turned every output into NaN."""
    from bnlab.core.functional import batch_norm_forward

    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        batch_norm_forward(x, None, None, eps=float("nan"), training=True)
