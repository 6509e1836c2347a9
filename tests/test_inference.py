"""The CPU inference path gives the flax module's outputs (BN folded, shifted depthwise)."""

import jax
import numpy as np
import pytest

from fgjax import models
from fgjax.models import inference


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("name,size,pretrained", [("efficientnet_lite0", 40, True),
                                                  ("small_cnn", 16, False)])
def test_predictor_matches_module(name, size, pretrained):
  spec = models.get(name, pretrained=pretrained)
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  want = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))(spec.variables, x)
  predict = inference.make_cpu_predictor(spec, batch_size=2)  # 2 chunks, one padded
  got = predict(x)
  assert isinstance(got, np.ndarray) and got.shape == (3, spec.feature_dim)
  _assert_close(got, want)
  _assert_close(predict(x[:1]), np.asarray(want)[:1])


def test_fold_changes_structure_not_function():
  spec = models.get("small_cnn")
  module, folded = inference.fold(spec.module, spec.variables, spec.bn_epsilon)
  assert module.fold_bn and "batch_stats" not in folded
  assert set(folded["params"]["stage0"]) == {"conv"}
  assert set(folded["params"]["stage0"]["conv"]) == {"kernel", "bias"}
  with pytest.raises(ValueError, match="train=False"):
    module.apply(folded, np.zeros((1, 8, 8, 3), np.float32), train=True)


def test_predictor_input_errors():
  spec = models.get("small_cnn")
  predict = inference.make_cpu_predictor(spec, batch_size=4)
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    predict(np.zeros((2, 3, 8, 8), np.float32))
  with pytest.raises(TypeError, match="float"):
    predict(np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="batch_size"):
    inference.make_cpu_predictor(spec, batch_size=0)
  with pytest.raises(ValueError, match="variables"):
    inference.make_cpu_predictor(spec.module)


@pytest.mark.parametrize("name,pretrained,top", [("efficientnet_lite0", True, True),
                                                 ("squeezenet1_1", False, False)])
def test_onnx_predictor_matches_module(name, pretrained, top):
  pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
  pytest.importorskip("onnxruntime", reason="ONNX predictor needs onnxruntime")
  spec = models.get(name, pretrained=pretrained, include_top=top)
  x = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype(np.float32)
  want = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))(spec.variables, x)
  got = inference.make_onnx_predictor(spec, batch_size=2)(x)
  assert got.shape == np.shape(want)
  _assert_close(got, want)


@pytest.mark.parametrize("name,activation,count", [("efficientnet_lite0", "Clip", 33),
                                                   ("squeezenet1_1", "Relu", 26)])
def test_onnx_export_emits_fusable_ops(name, activation, count):
  # onnxruntime fuses Conv + activation only for Conv-with-bias followed by Relu / Clip.
  onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
  spec = models.get(name, include_top=True)
  module, folded = inference.fold(spec.module, spec.variables, spec.bn_epsilon)
  model = inference.to_onnx(module.clone(conv_impl="lax"), folded, (1, 32, 32, 3))
  onnx.checker.check_model(model)
  ops = [n.op_type for n in model.graph.node]
  assert ops.count(activation) == count
  assert not {"Max", "Min", "MatMul", "ReduceSum", "Div"} & set(ops)
  convs = [n for n in model.graph.node if n.op_type == "Conv"]
  assert convs and all(len(n.input) == 3 for n in convs)
  assert ops.count("GlobalAveragePool") == 1 and ops.count("Gemm") == int(
      name == "efficientnet_lite0")
  # Only the residual adds of the inverted-bottleneck blocks stay Add (Lite0: 9).
  assert ops.count("Add") == (9 if name == "efficientnet_lite0" else 0)
  clip = next((n for n in model.graph.node if n.op_type == "Clip"), None)
  if clip is not None:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert (float(inits[clip.input[1]]), float(inits[clip.input[2]])) == (0.0, 6.0)


def test_cpu_predictor_onnx_engine():
  pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
  pytest.importorskip("onnxruntime", reason="ONNX predictor needs onnxruntime")
  spec = models.get("small_cnn")
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  want = spec.module.apply(spec.variables, x, train=False)
  _assert_close(inference.make_cpu_predictor(spec, batch_size=2, engine="onnx")(x), want)
  with pytest.raises(ValueError, match="engine"):
    inference.make_cpu_predictor(spec, engine="tflite")
  with pytest.raises(ValueError, match="fold_bn"):
    inference.make_cpu_predictor(spec, engine="onnx", fold_bn=False)
  with pytest.raises(ValueError, match="variables"):
    inference.make_onnx_predictor(spec.module)
  with pytest.raises(ValueError, match="batch_size"):
    inference.make_onnx_predictor(spec, batch_size=0)


def test_fuse_leaves_shared_values_alone():
  # A value with a second consumer (here: also a graph output) must not be fused away.
  helper = pytest.importorskip("onnx", reason="ONNX export needs the onnx package").helper
  consts = {"w": np.ones((4, 3, 1, 1), np.float32), "b": np.ones((1, 4, 1, 1), np.float32),
            "zero": np.float32(0), "six": np.float32(6)}
  nodes = [helper.make_node("Conv", ["x", "w"], ["conv"]),
           helper.make_node("Add", ["conv", "b"], ["biased"]),
           helper.make_node("Max", ["zero", "biased"], ["relu"]),
           helper.make_node("Min", ["six", "relu"], ["out"])]
  fused = inference._fuse(list(nodes), dict(consts), {}, ["out"])
  assert [n.op_type for n in fused] == ["Conv", "Clip"]
  assert list(fused[0].input)[:2] == ["x", "w"] and len(fused[0].input) == 3
  kept = inference._fuse(list(nodes), dict(consts), {}, ["out", "conv", "relu"])
  assert [n.op_type for n in kept] == ["Conv", "Add", "Relu", "Min"]
