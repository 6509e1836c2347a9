"""fgjax.export.int8: calibration from given images, batch-free stored ranges, int8
outputs close to fp32, and refusals that name the op types or the misfit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import export
from fgjax.export import int8
from fgjax.export import onnx as onnx_export


class _Net(nn.Module):
  """Two convolutions and a projection; 'unit' adds an l2 normalisation, whose Div,
  ReduceSum and Sqrt have no int8 kernels."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    y = nn.relu(nn.Conv(16, (3, 3), name="conv2")(y))
    e = nn.Dense(8, name="proj")(y.mean((1, 2)))
    return {"embedding": e, "unit": e / jnp.sqrt((e * e).sum(-1, keepdims=True))}


class _Wider(_Net):
  """Another network: same ops, one more convolution, so other tensor names."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(3, (1, 1), name="extra")(x))
    return super().__call__(x, train)


def _images(seed, n=24, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, (n, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def net():
  module = _Net()
  return module, module.init(jax.random.key(0), _images(0, 1))


def calibration_of(net):
  """The int8 calibration of `net` on 64 fixed images."""
  module, variables = net
  return export.calibrate_int8(module, variables, images=_images(3, n=64),
                               outputs=("embedding",))


def _input_tensor(module, variables):
  """The graph's first tensor: the images transposed to NCHW."""
  graph = onnx_export.to_onnx(module, variables, (2, 8, 8, 3), ("embedding",)).graph
  return next(n.output[0] for n in graph.node if onnx_export.INPUT_NAME in n.input)


def test_calibration_is_min_max_of_exactly_the_given_images(net):
  module, variables = net
  # 20 images: one chunk of 16 and one of 4 filled with repeats of its own images.
  x = _images(1, n=20, low=0.5, high=2.0)
  calibration = export.calibrate_int8(module, variables, images=x,
                                      outputs=("embedding",))
  first = calibration["data"][_input_tensor(module, variables)]
  assert first["lowest"]["data"][0] == pytest.approx(float(x.min()), abs=0)
  assert first["highest"]["data"][0] == pytest.approx(float(x.max()), abs=0)
  assert export.calibrate_int8(module, variables, images=x,
                               outputs=("embedding",)) == calibration
  other = export.calibrate_int8(module, variables, images=_images(2),
                                outputs=("embedding",))
  assert other["data"].keys() == calibration["data"].keys()
  assert other != calibration


def test_int8_is_close_to_fp32_and_independent_of_the_batch(net):
  module, variables = net
  calibration = calibration_of(net)
  x = _images(4, n=13)
  want = np.asarray(module.apply(variables, x)["embedding"])
  outs = [export.make_cpu_predictor(module, variables, bs, outputs=("embedding",),
                                    engine="onnx-int8", image_size=8,
                                    int8_calibration=calibration)(x)["embedding"]
          for bs in (1, 5, 16)]
  # One stored calibration serves every compiled batch size with the same numbers.
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])
  err = np.abs(outs[0] - want).max() / np.abs(want).max()
  assert 0 < err < 0.05  # int8, so not exact; 8-bit steps of the range, so close.


def test_ops_without_int8_kernels_are_refused_unless_accepted(net):
  module, variables = net
  x = _images(5)
  with pytest.raises(int8.Int8Error, match=r"_Net.*Div, ReduceSum, Sqrt.*engine='onnx'"
                     r".*float_ops=\('Div', 'ReduceSum', 'Sqrt'\)") as err:
    export.calibrate_int8(module, variables, images=x, outputs=("unit",))
  assert isinstance(err.value, ValueError)
  accepted = ("Div", "ReduceSum", "Sqrt")
  calibration = export.calibrate_int8(module, variables, images=x, outputs=("unit",),
                                      float_ops=accepted)
  with pytest.raises(int8.Int8Error, match="Div, ReduceSum, Sqrt"):
    export.make_cpu_predictor(module, variables, 4, outputs=("unit",),
                              engine="onnx-int8", image_size=8,
                              int8_calibration=calibration)
  got = export.make_cpu_predictor(module, variables, 4, outputs=("unit",),
                                  engine="onnx-int8", image_size=8,
                                  int8_calibration=calibration,
                                  float_ops=accepted)(x)["unit"]
  # The accepted ops run in fp32 on dequantised inputs: unit norm up to int8 steps.
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=5e-3)
  want = np.asarray(module.apply(variables, x)["unit"])
  assert np.abs(got - want).max() < 0.1


def test_a_calibration_of_another_network_is_refused(net):
  module, variables = net
  other = _Wider()
  calibration = export.calibrate_int8(
      other, other.init(jax.random.key(1), _images(0, 1)), images=_images(6),
      outputs=("embedding",))
  with pytest.raises(int8.Int8Error, match="does not fit the ONNX graph of _Net"):
    export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                              engine="onnx-int8", image_size=8,
                              int8_calibration=calibration)
  with pytest.raises(int8.Int8Error, match="empty or not onnxruntime's"):
    export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                              engine="onnx-int8", image_size=8,
                              int8_calibration={"data": {}})


def test_engine_and_calibration_go_together(net):
  module, variables = net
  with pytest.raises(ValueError, match="needs int8_calibration"):
    export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                              engine="onnx-int8", image_size=8)
  with pytest.raises(ValueError, match="int8_calibration is for int8 engines"):
    export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                              engine="onnx", image_size=8, int8_calibration={})
  with pytest.raises(ValueError, match=r"\(N >= 1, H, W, 3\)|empty batch"):
    export.calibrate_int8(module, variables, images=np.zeros((0, 8, 8, 3), np.float32),
                          outputs=("embedding",))
