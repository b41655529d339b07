"""bnlab.port, whole models: seed_cnn's BN layers converted by name, outputs compared.

The seed CNN is written out in Keras, Flax linen and ONNX here (the conv/linear weights are
copied by these tests; only the BN layers go through bnlab.port, found and matched by name).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from bnlab.errors import BnlabError
from bnlab.models import build_model
from bnlab.port import PortWarning, convert_bn_layers, read_bn_layers, session
from bnlab.port import _harness as H

IN_SHAPE = (1, 8, 8)
BN_NAMES = ("conv1.norm", "conv2.norm", "fc1.norm")


def _keras_name(name: str) -> str:
    return name.replace(".", "_")


def _torch_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("seed_cnn", norm="bn", in_shape=IN_SHAPE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in BN_NAMES:
            bn = model.get_submodule(name)
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def _weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, *IN_SHAPE)).astype(np.float32)


def _torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- Keras


def _keras_model(w: dict[str, np.ndarray]) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((IN_SHAPE[1], IN_SHAPE[2], IN_SHAPE[0]))
    x = inp
    for block, ch in (("conv1", 32), ("conv2", 64)):
        x = layers.Conv2D(ch, 3, padding="same", name=f"{block}_layer")(x)
        x = layers.BatchNormalization(name=f"{block}_norm")(x)
        x = layers.MaxPooling2D(2)(layers.ReLU()(x))
    x = layers.Flatten()(layers.Permute((3, 1, 2))(x))  # torch's (C, H, W) flatten order
    x = layers.Dense(128, name="fc1_layer")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="fc1_norm")(x))
    model = keras.Model(inp, layers.Dense(10, name="fc2")(x))
    for block in ("conv1", "conv2"):
        model.get_layer(f"{block}_layer").set_weights(
            [w[f"{block}.layer.weight"].transpose(2, 3, 1, 0), w[f"{block}.layer.bias"]])
    model.get_layer("fc1_layer").set_weights([w["fc1.layer.weight"].T, w["fc1.layer.bias"]])
    model.get_layer("fc2").set_weights([w["fc2.weight"].T, w["fc2.bias"]])
    return model


def _keras_out(model: Any, x: np.ndarray) -> np.ndarray:
    import jax  # one compiled call instead of an eager op per layer (JAX backend)

    return np.asarray(jax.jit(lambda a: model(a, training=False))(np.moveaxis(x, 1, -1)))


def test_seed_cnn_torch_to_keras_by_name() -> None:
    src = _torch_model()
    dst = _keras_model(_weights(src))
    with pytest.warns(PortWarning, match="running variance"):  # stock Keras layers
        convert_bn_layers(src, dst, names=_keras_name)
    x = _x()
    assert H.rel_err(_keras_out(dst, x), _torch_out(src, x)) <= 1e-6


def test_seed_cnn_keras_to_torch_by_name() -> None:
    donor = _torch_model(seed=5)
    src = _keras_model(_weights(donor))
    rng = np.random.default_rng(7)
    for name in BN_NAMES:  # the Keras model's own random BN state
        layer = src.get_layer(_keras_name(name))
        c = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
                           rng.normal(0, 0.3, c), rng.uniform(0.5, 1.5, c)])
    dst = _torch_model(seed=5)
    with pytest.warns(PortWarning, match="running variance"):  # stock torch layers
        convert_bn_layers(src, dst, names={_keras_name(n): n for n in BN_NAMES})
    x = _x()
    assert dst.conv1.norm.eps == pytest.approx(1e-3)  # Keras' default eps came along
    assert H.rel_err(_torch_out(dst, x), _keras_out(src, x)) <= 1e-6


# --------------------------------------------------------------------------- Flax


def _flax_model(dtype: Any = np.float32) -> Any:
    import jax.numpy as jnp
    from flax import linen

    class SeedCNN(linen.Module):
        @linen.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            kw = {"param_dtype": dtype, "dtype": dtype}
            for block, ch in (("conv1", 32), ("conv2", 64)):
                x = linen.Conv(ch, (3, 3), padding=1, name=f"{block}_layer", **kw)(x)
                x = linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                    name=f"{block}_norm", **kw)(x)
                x = linen.max_pool(linen.relu(x), (2, 2), strides=(2, 2))
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
            x = linen.Dense(128, name="fc1_layer", **kw)(x)
            x = linen.relu(linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                           name="fc1_norm", **kw)(x))
            return linen.Dense(10, name="fc2", **kw)(x)

    return SeedCNN()


def _flax_variables(module: Any, w: dict[str, np.ndarray]) -> dict[str, Any]:
    import jax

    dt = next(iter(w.values())).dtype
    v = module.init(jax.random.PRNGKey(0), np.zeros((1, IN_SHAPE[1], IN_SHAPE[2], IN_SHAPE[0]),
                                                    dt))
    params = dict(v["params"])
    for block in ("conv1", "conv2"):
        params[f"{block}_layer"] = {"kernel": w[f"{block}.layer.weight"].transpose(2, 3, 1, 0),
                                    "bias": w[f"{block}.layer.bias"]}
    params["fc1_layer"] = {"kernel": w["fc1.layer.weight"].T, "bias": w["fc1.layer.bias"]}
    params["fc2"] = {"kernel": w["fc2.weight"].T, "bias": w["fc2.bias"]}
    return {"params": params, "batch_stats": dict(v["batch_stats"])}


def _flax_out(module: Any, variables: Any, x: np.ndarray) -> np.ndarray:
    import jax

    return np.asarray(jax.jit(module.apply)(variables, np.moveaxis(x, 1, -1)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_seed_cnn_torch_to_flax_by_name_and_back(dtype: str) -> None:
    with H.precision(dtype):
        _torch_flax_torch(np.dtype(dtype))


def _torch_flax_torch(dtype: np.dtype) -> None:
    tol = 1e-12 if dtype == np.float64 else 1e-6
    src = _torch_model().to(torch.float64 if dtype == np.float64 else torch.float32)
    module = _flax_model(dtype)
    variables = _flax_variables(module, _weights(src))
    x = _x().astype(dtype)
    example = (np.moveaxis(x, 1, -1),)
    with pytest.warns(PortWarning, match="running variance"):  # linen's BatchNorm is biased
        new = convert_bn_layers(src, (module, variables), names=_keras_name,
                                dst_example=example)
    assert H.rel_err(_flax_out(module, new, x), _torch_out(src, x)) <= tol
    states = read_bn_layers((module, new), example=example)
    assert sorted(states) == sorted(_keras_name(n) for n in BN_NAMES)
    back = _torch_model(seed=3).to(src.conv1.norm.weight.dtype)
    back.load_state_dict({k: v for k, v in src.state_dict().items() if ".norm." not in k},
                         strict=False)
    with pytest.warns(PortWarning, match="running variance"):
        convert_bn_layers((module, new), back, names=lambda n: n.replace("_", "."),
                          src_example=example)
    assert H.rel_err(_torch_out(back, x), _torch_out(src, x)) <= tol


# --------------------------------------------------------------------------- ONNX


def _onnx_model(w: dict[str, np.ndarray]) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    nodes, x = [], "input"
    for block in ("conv1", "conv2"):
        nodes += [
            helper.make_node("Conv", [x, f"{block}.layer.weight", f"{block}.layer.bias"],
                             [f"{block}_c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization",
                             [f"{block}_c", *(f"{block}.norm.{k}" for k in
                                              ("weight", "bias", "running_mean", "running_var"))],
                             [f"{block}_n"], name=f"/{block}/norm/BatchNormalization"),
            helper.make_node("Relu", [f"{block}_n"], [f"{block}_r"]),
            helper.make_node("MaxPool", [f"{block}_r"], [f"{block}_p"], kernel_shape=[2, 2],
                             strides=[2, 2]),
        ]
        x = f"{block}_p"
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc1.layer.weight", "fc1.layer.bias"], ["fc1_g"],
                         transB=1),
        helper.make_node("BatchNormalization",
                         ["fc1_g", *(f"fc1.norm.{k}" for k in
                                     ("weight", "bias", "running_mean", "running_var"))],
                         ["fc1_n"]),
        helper.make_node("Relu", ["fc1_n"], ["fc1_r"]),
        helper.make_node("Gemm", ["fc1_r", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in w.items()
             if not k.endswith("num_batches_tracked")]
    graph = helper.make_graph(
        nodes, "seed_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IN_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    return model


def _onnx_out(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session(model).run(None, {"input": x})[0])


def test_seed_cnn_torch_to_onnx_by_name() -> None:
    src = _torch_model()
    fresh = _torch_model(seed=9)  # other BN statistics, same names
    dst = _onnx_model(_weights(src) | {k: v for k, v in _weights(fresh).items() if ".norm." in k})
    x = _x()
    assert H.rel_err(_onnx_out(dst, x), _torch_out(src, x)) > 1e-3  # before: different BN
    convert_bn_layers(src, dst)  # names match: torch.onnx's initializer naming
    assert H.rel_err(_onnx_out(dst, x), _torch_out(src, x)) <= 1e-6


def test_seed_cnn_onnx_to_torch_by_name() -> None:
    from onnx import numpy_helper

    donor = _torch_model(seed=4)
    src = _onnx_model(_weights(donor))
    rng = np.random.default_rng(11)
    for t in src.graph.initializer:  # the ONNX model's own BN statistics
        if ".norm." in t.name:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(
                (a + rng.uniform(0.1, 0.5, a.shape)).astype(np.float32), t.name))
    dst = _torch_model(seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_bn_layers(src, dst)  # eval graphs: no warning, BiasedBatchNorm not needed
    x = _x()
    assert H.rel_err(_torch_out(dst, x), _onnx_out(src, x)) <= 1e-6


def test_unmatched_names_are_listed() -> None:
    src = _torch_model()
    dst = _keras_model(_weights(src))
    with pytest.raises(BnlabError, match=r"no target layer for \['conv1.norm'"):
        convert_bn_layers(src, dst)


def test_seed_cnn_into_a_torch_onnx_export_with_deduplicated_initializers() -> None:
    import io

    import onnx

    # A fresh model's running_var equals its weight (ones) and running_mean its bias
    # (zeros): torch.onnx keeps one initializer of each pair and an Identity for the other.
    fresh = build_model("seed_cnn", norm="bn", in_shape=IN_SHAPE).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's legacy exporter
        torch.onnx.export(fresh, (torch.zeros(4, *IN_SHAPE),), buf, dynamo=False,
                          do_constant_folding=False, input_names=["input"])
    exported = onnx.load_from_string(buf.getvalue())
    assert any(n.op_type == "Identity" for n in exported.graph.node)
    src = _torch_model()
    src.load_state_dict({k: v for k, v in fresh.state_dict().items() if ".norm." not in k},
                        strict=False)
    convert_bn_layers(src, exported)
    onnx.checker.check_model(exported)
    x = _x()
    assert H.rel_err(_onnx_out(exported, x), _torch_out(src, x)) <= 1e-6
    assert sorted(read_bn_layers(exported)) == sorted(BN_NAMES)
