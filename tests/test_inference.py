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
