"""bnlab.port, one layer: eval parity, continued training, and the conventions' limits.

The harness (bnlab.port._harness) builds the source layer with its framework's own API, so
every comparison is against the real framework, never against bnlab's idea of it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bnlab.errors import BnlabError
from bnlab.port import (
    BNState,
    PortWarning,
    from_onnx,
    from_torch,
    session,
    to_flax,
    to_keras,
    to_nnx,
    to_onnx,
    to_torch,
)
from bnlab.port import _harness as H

EVAL_SHAPES = {2: (16, 3), 4: (4, 3, 3, 3)}


def _measure(case: H.Case, conversion: str = "bnlab") -> H.Result:
    with warnings.catch_warnings():
        # Keras float64 (computes in float32) and torch→ONNX training (biased update) warn;
        # both are asserted in their own tests.
        warnings.simplefilter("ignore", PortWarning)
        return H.measure(case, conversion)


@pytest.mark.parametrize("pair", H.PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_outputs_agree(pair: tuple[str, str], rank: int, affine: bool, dtype: str) -> None:
    case = H.Case(*pair, dtype=dtype, shape=EVAL_SHAPES[rank], affine=affine, steps=0,
                  momentum=0.1, eps=1e-3)
    r = _measure(case)
    # Keras' BatchNormalization computes in float32 even in float64 (see the behaviour
    # table), so a pair with Keras has float64 on one side only: float32 accuracy there.
    tol = 1e-12 if dtype == "float64" and "keras" not in pair else 1e-6
    assert r.eval_err <= tol, r


@pytest.mark.parametrize("pair", [("torch", "keras"), ("keras", "torch"), ("torch", "flax"),
                                  ("flax", "torch")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("momentum", [0.1, 0.01])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_running_stats_agree_after_100_training_steps(pair: tuple[str, str], momentum: float,
                                                      eps: float) -> None:
    case = H.Case(*pair, momentum=momentum, eps=eps, steps=100, shape=(8, 3, 2, 2))
    ours = _measure(case, "bnlab")
    assert ours.mean_err <= 1e-6 and ours.var_err <= 1e-6, ours
    assert ours.train_out_err <= 1e-5, ours
    if (momentum, eps) == (0.1, 1e-5):  # the full grid of naive errors is `bnlab port check`
        # The naive copy (momentum as the number it is) is off by orders of magnitude.
        naive = _measure(case, "naive")
        assert min(naive.mean_err, naive.var_err) > 1e3 * max(ours.mean_err, ours.var_err,
                                                              1e-9)


@pytest.mark.parametrize("momentum", [0.1, 0.01])
def test_onnx_training_graph_continues_in_torch(momentum: float) -> None:
    # ONNX attributes are float32: momentum 0.99 is 0.99000001 there, which torch (float64
    # momentum) reproduces only to ~1e-8 per step, ~1e-6 after 100 steps.
    r = _measure(H.Case("onnx", "torch", momentum=momentum, steps=100, shape=(8, 3, 2, 2)))
    assert r.mean_err <= 1e-5 and r.var_err <= 1e-5, r


def test_torch_to_onnx_training_warns_and_measures_the_variance_estimator_error() -> None:
    n = 8 * 2 * 2  # values per channel per batch
    case = H.Case("torch", "onnx", momentum=0.1, steps=100, shape=(8, 3, 2, 2))
    with pytest.warns(PortWarning, match=r"running variance.*biased.*n/\(n-1\)"):
        r = H.measure(case, "bnlab")
    assert r.mean_err <= 1e-6
    # ONNX adds the biased batch variance: the running variances drift apart by ~1/n.
    assert 0.2 / n < r.var_err <= 1.0 / (n - 1)


def test_stock_keras_layer_warns_about_the_variance_update_and_the_error_is_as_stated() -> None:
    case = H.Case("torch", "keras", momentum=0.1, steps=100, shape=(8, 3, 2, 2))
    src = H.native_source("torch", H.random_truth(3, "float32", momentum=0.1, eps=1e-5,
                                                   affine=True, rng=np.random.default_rng(0)), 4)
    with pytest.warns(PortWarning, match="running variance in continued training"):
        to_keras(src.state(), update_rule="target")
    r = _measure(case, "naive")
    ours = _measure(case, "bnlab")
    assert ours.var_err <= 1e-6 < r.var_err


def test_keras_float64_warns_that_it_computes_in_float32() -> None:
    state = H.random_truth(3, "float64", momentum=0.1, eps=1e-5, affine=True,
                           rng=np.random.default_rng(0))
    with H.precision("float64"), pytest.warns(PortWarning, match="computes in float32"):
        to_keras(state, rank=2)


def test_float64_flax_needs_jax_x64_and_says_so() -> None:
    state = H.random_truth(3, "float64", momentum=0.1, eps=1e-5, affine=True,
                           rng=np.random.default_rng(0))
    with pytest.raises(BnlabError, match="jax_enable_x64"):
        to_flax(state)


# --------------------------------------------------------------------------- the limits


def _torch_bn(**kwargs: object) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(3, **kwargs)  # type: ignore[arg-type]
    bn.train()
    with torch.no_grad():
        for _ in range(3):
            bn(torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1)
    return bn


def test_momentum_none_is_exact_in_torch_and_warned_with_the_drift_elsewhere() -> None:
    bn = _torch_bn(momentum=None)
    state = from_torch(bn)
    assert state.momentum is None and state.num_batches_tracked == 3
    back = to_torch(state)
    assert back.momentum is None and int(back.num_batches_tracked) == 3
    for convert in (lambda s: to_keras(s), lambda s: to_flax(s),
                    lambda s: to_onnx(s, training=True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PortWarning)
            convert(state)
        texts = [str(w.message) for w in caught]
        assert any("momentum=None" in t and "num_batches_tracked=3" in t and "1/(N+1)" in t
                   for t in texts), texts
    # The constant momentum 1/(N+1) reproduces the next step exactly.
    with pytest.warns(PortWarning):
        layer = to_keras(state, rank=4)
    x = np.random.default_rng(1).normal(size=(8, 3, 2, 2)).astype(np.float32)
    bn(torch.from_numpy(x))
    layer(np.moveaxis(x, 1, -1), training=True)
    got = np.asarray(layer.moving_mean.value)
    assert H.rel_err(got, bn.running_mean.numpy()) <= 1e-6
    assert H.rel_err(np.asarray(layer.moving_variance.value), bn.running_var.numpy()) <= 1e-6


def test_affine_off_converts_exactly_and_a_scale_cannot_go_into_an_affine_free_layer() -> None:
    bn = _torch_bn(affine=False)
    state = from_torch(bn)
    assert state.weight is None and state.bias is None
    layer = to_keras(state, rank=4)
    assert not layer.scale and not layer.center
    module, variables = to_flax(state)
    assert not module.use_scale and "params" not in variables
    scaled = BNState(weight=np.full(3, 2.0, np.float32), bias=np.zeros(3, np.float32),
                     mean=np.zeros(3, np.float32), var=np.ones(3, np.float32))
    from bnlab.port import load_torch

    with pytest.raises(BnlabError, match="affine=False"):
        load_torch(torch.nn.BatchNorm2d(3, affine=False), scaled)


def test_tracking_off_is_exact_in_flax_and_onnx_and_refused_by_keras() -> None:
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    state = from_torch(bn)
    assert not state.tracks_stats
    x = np.random.default_rng(2).normal(1.0, 2.0, (8, 3, 2, 2)).astype(np.float32)
    with torch.no_grad():
        ref = bn(torch.from_numpy(x)).numpy()  # eval with batch statistics
    with pytest.raises(BnlabError, match=r"track_running_stats=False.*Keras"):
        to_keras(state)
    module, variables = to_flax(state)
    y, _ = module.apply(variables, np.moveaxis(x, 1, -1), mutable=["batch_stats"])
    assert H.rel_err(np.moveaxis(np.asarray(y), -1, 1), ref) <= 1e-6
    model = to_onnx(state)
    assert H.rel_err(session(model).run(None, {"X": x})[0], ref) <= 1e-6
    back = from_onnx(model)
    assert not back.tracks_stats
    t = to_torch(back)
    assert t.running_mean is None and not t.track_running_stats


def test_biased_torch_layer_is_a_batchnorm_and_unbiased_ones_are_the_frameworks() -> None:
    import keras
    from flax import linen

    import bnlab.port as port

    assert issubclass(port.BiasedBatchNorm2d, torch.nn.BatchNorm2d)
    assert issubclass(port.UnbiasedBatchNormalization, keras.layers.BatchNormalization)
    assert issubclass(port.UnbiasedBatchNorm, linen.Module)
    keras_state = BNState(weight=None, bias=None, mean=np.zeros(3, np.float32),
                          var=np.ones(3, np.float32), variance_update="biased")
    assert type(to_torch(keras_state)).__name__ == "BiasedBatchNorm2d"
    with pytest.warns(PortWarning, match="running variance"):
        assert type(to_torch(keras_state, update_rule="target")) is torch.nn.BatchNorm2d


def test_nnx_round_trip_is_exact() -> None:
    bn = _torch_bn()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    state = from_torch(bn)
    with pytest.warns(PortWarning, match="running variance"):
        layer = to_nnx(state)
    x = np.random.default_rng(3).normal(size=(4, 3, 2, 2)).astype(np.float32)
    layer.use_running_average = True
    y = np.moveaxis(np.asarray(layer(np.moveaxis(x, 1, -1))), -1, 1)
    with torch.no_grad():
        ref = bn.eval()(torch.from_numpy(x)).numpy()
    assert H.rel_err(y, ref) <= 1e-6
    from bnlab.port import from_nnx

    back = from_nnx(layer)
    assert back.momentum is not None and abs(back.momentum - 0.1) < 1e-12


def test_bnlab_core_layer_converts_like_torch() -> None:
    import bnlab.core as core

    layer = core.BatchNorm2d(3, eps=1e-3, momentum=0.2)
    layer.running_mean[...] = [0.5, -1.0, 2.0]
    layer.weight[...] = [1.5, 0.5, 2.0]
    state = from_torch(layer)
    assert state.eps == 1e-3 and state.momentum == 0.2
    k = to_keras(state, rank=4)
    assert abs(k.momentum - 0.8) < 1e-12 and k.epsilon == 1e-3
