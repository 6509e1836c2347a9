"""ONNX export of fgjax networks and the onnxruntime forward behind engine='onnx'.

`to_onnx(module, variables, input_shape, outputs)` translates the jaxpr of the
(BN-folded, conv_impl='lax') forward primitive by primitive into an onnx.ModelProto
whose graph outputs are the requested output names. Optional dependency: `onnx` (and
`onnxruntime` to run it).

The translation itself (layouts, the primitives it knows) is fgjax.export.onnx_translate;
this module builds the model, its onnxruntime session and the engine's forward.

A primitive without a translation raises `UnsupportedPrimitive` (a NotImplementedError
naming it); fgjax.export.make_cpu_predictor turns that into an `OnnxExportError` at
build time. Only the equations the requested outputs depend on are translated, so an
unsupported op feeding an output nobody asked for does not block the export.
"""

import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.export import onnx_fusion
from fgjax.export._common import output_names, select_outputs
from fgjax.export.onnx_translate import NCHW, Translator, UnsupportedPrimitive, Val
from fgjax.export.onnx_translate import onnx_type

OPSET = 17
INPUT_NAME = "images"

__all__ = ["INPUT_NAME", "OPSET", "OnnxExportError", "UnsupportedPrimitive",
           "default_threads", "make_forward", "session", "to_onnx"]


class OnnxExportError(ValueError):
  """engine='onnx' cannot serve a network; raised when the predictor is built."""


def to_onnx(module: nn.Module, variables: dict[str, Any],
            input_shape: tuple[int, int, int, int], outputs: Sequence[str]) -> Any:
  """Exports `module.apply(variables, x, train=False)[name] for name in outputs`.

  Args:
    module: flax module returning a dict (BN-folded with conv_impl='lax' for the fast
      ONNX ops; see fgjax.export.fold).
    variables: its variables (closed over as initializers).
    input_shape: static (N, H, W, 3) input shape; the graph input is named 'images'.
    outputs: names of the dict entries to export; they name the graph outputs.

  Returns:
    onnx.ModelProto (opset 17).

  Raises:
    UnsupportedPrimitive: a primitive the requested outputs need has no translation.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top

  outputs = output_names(outputs)
  if any(n.startswith("_") or n == INPUT_NAME for n in outputs):
    raise ValueError(f"output names {outputs} may not start with '_' or be "
                     f"{INPUT_NAME!r} (reserved for the graph).")
  who = type(module).__name__
  closed = jax.make_jaxpr(lambda x: select_outputs(
      module.apply(variables, x, train=False), outputs, who))(
          jax.ShapeDtypeStruct(input_shape, jnp.float32))
  tr = Translator()
  for cv, c in zip(closed.jaxpr.constvars, closed.consts):
    tr.env[cv] = np.asarray(c)
  images = Val(tr.node("Transpose", [INPUT_NAME], perm=list(NCHW)), NCHW,
               input_shape, np.float32)
  vals = tr.run(closed.jaxpr, [images], [True] * len(outputs))
  out_infos = []
  for name, var, val in zip(outputs, closed.jaxpr.outvars, vals):
    val = tr.value(val)
    tr.nodes.append(helper.make_node("Identity", [tr.plain(val)], [name]))
    out_infos.append(helper.make_tensor_value_info(name, onnx_type(var.aval.dtype),
                                                   list(var.aval.shape)))
  nodes = onnx_fusion.fuse(tr.nodes, tr.consts, tr.spatial_sums, list(outputs),
                           tr.matmul_2d)
  nodes = onnx_fusion.prune(nodes, outputs)
  used = {i for n in nodes for i in n.input}
  inits = [numpy_helper.from_array(v, k) for k, v in tr.consts.items() if k in used]
  graph = helper.make_graph(
      nodes, "fgjax", [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT,
                                                     list(input_shape))],
      out_infos, inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def default_threads() -> int:
  """onnxruntime intra-op threads: the CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def session(model: Any, threads: Optional[int] = None) -> Any:
  """An onnxruntime CPU InferenceSession (ORT_ENABLE_ALL, `threads` intra-op threads)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads or default_threads()
  opts.inter_op_num_threads = 1
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  return ort.InferenceSession(model.SerializeToString(), opts,
                              providers=["CPUExecutionProvider"])


def make_forward(module: nn.Module, variables: dict[str, Any], batch_size: int,
                 outputs: Sequence[str], probe_hw: tuple[int, int],
                 threads: Optional[int] = None) -> Callable[[np.ndarray], dict]:
  """forward(chunk (batch_size, H, W, 3) float32) -> {name: np.ndarray} in onnxruntime.

  `module` / `variables` are already folded (fgjax.export.fold, conv_impl='lax'). One
  export and session per input spatial size; the one for `probe_hw` is built now, so
  an unsupported primitive raises here (UnsupportedPrimitive), not on first use.
  """
  sessions: dict[tuple[int, int], Any] = {}
  names = list(outputs)

  def get(hw):
    if hw not in sessions:
      sessions[hw] = session(to_onnx(module, variables, (batch_size,) + hw + (3,),
                                     names), threads)
    return sessions[hw]

  get(tuple(probe_hw))

  def forward(chunk: np.ndarray) -> dict[str, np.ndarray]:
    res = get(tuple(chunk.shape[1:3])).run(names, {INPUT_NAME: chunk})
    return dict(zip(names, res))

  return forward
