"""engine='openvino': fgjax's ONNX export (fp32, or the int8 QDQ graph) run by OpenVINO.

An optional extra (`pip install fgjax[openvino]`). On the 2-core AVX-512 VNNI / BF16 VM
of BENCHMARKS.md section 13 it is the fastest CPU path: OpenVINO runs the same int8
QDQ graph as engine='onnx-int8' faster than onnxruntime does, and has a bf16 mode.

`precision` is explicit and 'fp32' by default: OpenVINO's own default on a CPU with
bf16 is bf16, which would change results without a word. 'bf16' is refused on a CPU
without it (OpenVINO would quietly run fp32); 'int8' needs the stored calibration
(fgjax.export.int8) and runs the graph onnxruntime's quantiser writes.
"""

import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import numpy as np

from fgjax.export import int8 as int8_lib
from fgjax.export import onnx as onnx_lib

PRECISIONS = ("fp32", "bf16", "int8")
# OpenVINO's INFERENCE_PRECISION_HINT per precision; an int8 graph's quantised ops run
# in int8 and the rest in fp32.
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def _core():
  try:
    import openvino  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("engine='openvino' needs OpenVINO: pip install 'fgjax[openvino]' "
                      "(or openvino), or use engine='onnx' / 'onnx-int8'.") from e
  return openvino.Core()


def check_precision(precision: str, core: Any = None) -> None:
  """ValueError for an unknown precision, or 'bf16' on a CPU without bf16."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r} is unknown for engine='openvino'; use "
                     f"one of {', '.join(PRECISIONS)}.")
  if precision == "bf16":
    caps = (core or _core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
      raise ValueError("precision='bf16': this CPU has no bf16 support (OpenVINO "
                       f"capabilities: {', '.join(caps)}), so OpenVINO would run fp32; "
                       "use precision='fp32' or 'int8'.")


def make_forward(module: nn.Module, variables: dict[str, Any], batch_size: int,
                 outputs: Sequence[str], probe_hw: tuple[int, int], precision: str,
                 calibration: Optional[dict[str, Any]] = None,
                 float_ops: Sequence[str] = (),
                 threads: Optional[int] = None) -> Callable[[np.ndarray], dict]:
  """forward(chunk (batch_size, H, W, 3) float32) -> {name: np.ndarray} in OpenVINO.

  `module` / `variables` are folded (conv_impl='lax'). One graph and compiled model per
  input size; the one for `probe_hw` is built now, so refusals come here.
  """
  core = _core()
  check_precision(precision, core)
  if (precision == "int8") != (calibration is not None):
    raise ValueError("precision='int8' needs the int8 calibration (an artifact's, or "
                     "fgjax.export.calibrate_int8), and only it takes one.")
  names = list(outputs)
  who = type(module).__name__
  config = {"INFERENCE_PRECISION_HINT": _HINT[precision],
            "INFERENCE_NUM_THREADS": threads or onnx_lib.default_threads(),
            "PERFORMANCE_HINT": "LATENCY"}
  requests: dict[tuple[int, int], tuple[Any, list[Any]]] = {}

  def get(hw):
    if hw not in requests:
      graph = int8_lib.export_graph(module, variables, batch_size, hw, names)
      if precision == "int8":
        graph = int8_lib.quantize(graph, calibration, float_ops, who)
      with tempfile.TemporaryDirectory(prefix="fgjax_openvino_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
          f.write(graph.SerializeToString())
        compiled = core.compile_model(core.read_model(path), "CPU", config)
      requests[hw] = (compiled.create_infer_request(),
                      [compiled.output(n) for n in names])
    return requests[hw]

  get(tuple(probe_hw))

  def forward(chunk: np.ndarray) -> dict[str, np.ndarray]:
    request, ports = get(tuple(chunk.shape[1:3]))
    result = request.infer({onnx_lib.INPUT_NAME: chunk})
    # The request reuses its output buffers on the next call.
    return {n: np.array(result[p]) for n, p in zip(names, ports)}

  return forward
