"""engine='openvino': fp32 equals the module, bf16 and int8 are what they say (close,
not equal), and a precision the CPU or the artifact cannot give is refused."""

import jax
import numpy as np
import pytest

from fgjax import export
from tests.test_int8 import _images, _Net, calibration_of

openvino = pytest.importorskip("openvino", reason="engine='openvino' needs openvino "
                               "(pip install 'fgjax[openvino]'; in the test extra)")


@pytest.fixture(scope="module")
def net():
  module = _Net()
  return module, module.init(jax.random.key(0), _images(0, 1))


def _predict(net, precision, **kw):
  module, variables = net
  return export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                                   engine="openvino", image_size=8,
                                   precision=precision, **kw)


def _bf16():
  return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_fp32_is_the_default_and_matches_the_module(net):
  module, variables = net
  x = _images(7, n=9)
  want = np.asarray(module.apply(variables, x)["embedding"])
  got = export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                                  engine="openvino", image_size=8)(x)["embedding"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_int8_runs_the_calibrated_graph(net):
  module, variables = net
  calibration = calibration_of(net)
  x = _images(8, n=9)
  want = np.asarray(module.apply(variables, x)["embedding"])
  got = _predict(net, "int8", int8_calibration=calibration)(x)["embedding"]
  onnxruntime = export.make_cpu_predictor(
      module, variables, 4, outputs=("embedding",), engine="onnx-int8", image_size=8,
      int8_calibration=calibration)(x)["embedding"]
  scale = np.abs(want).max()
  assert 0 < np.abs(got - want).max() / scale < 0.05
  # The same quantised graph: OpenVINO and onnxruntime round alike up to a step or two.
  assert np.abs(got - onnxruntime).max() / scale < 0.02
  with pytest.raises(ValueError, match="needs int8_calibration"):
    _predict(net, "int8")
  with pytest.raises(ValueError, match="int8_calibration is for int8 engines"):
    _predict(net, "fp32", int8_calibration=calibration)


def test_bf16_rounds_or_is_refused(net):
  module, variables = net
  if not _bf16():
    with pytest.raises(ValueError, match="no bf16 support"):
      _predict(net, "bf16")
    return
  x = _images(9, n=9)
  want = np.asarray(module.apply(variables, x)["embedding"])
  err = np.abs(_predict(net, "bf16")(x)["embedding"] - want).max() / np.abs(want).max()
  assert 1e-4 < err < 0.05  # bf16 keeps 8 significant bits: not fp32, not far off.


def test_bad_precisions(net):
  module, variables = net
  with pytest.raises(ValueError, match="precision='fp16' is unknown.*fp32, bf16, int8"):
    _predict(net, "fp16")
  with pytest.raises(ValueError, match="precision='bf16' is a parameter of "
                     "engine='openvino'"):
    export.make_cpu_predictor(module, variables, 4, outputs=("embedding",),
                              engine="onnx", image_size=8, precision="bf16")
