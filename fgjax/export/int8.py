"""int8 CPU serving: post-training static quantisation of fgjax's own ONNX export.

EfficientNet-Lite was designed to be quantised (ReLU6, no squeeze-excite), and the
impostor networks paper's point is recognition that is fast on a CPU. This module turns
the fp32 graph of engine='onnx' (fgjax.export.onnx) into a QDQ graph with onnxruntime's
quantisation tools - activations uint8, weights int8 per output channel, the
combination onnxruntime's x86 kernels (VNNI) run fastest - in two steps:

  calibration = int8.calibrate(module, variables, images, outputs)   # at export time
  forward = int8.make_forward(module, variables, 32, outputs, (224, 224), calibration)

`calibrate` runs the fp32 graph over the given images (the run's own training images
when fgjax.train exports an artifact) and records each quantised tensor's min / max
(onnxruntime's MinMax calibrator). The result is onnxruntime's calibration cache, a
JSON-able dict, which the artifact stores; `make_forward` quantises a graph of any
batch size and image size from it without running a single image, so serving never
calibrates. The translator names tensors by their place in the jaxpr, which does not
depend on the batch size, so one calibration serves every compiled batch; a
calibration that does not fit the graph is refused (`Int8Error`), never half applied.

Ops outside onnxruntime's quantisation registries would stay fp32 between
Dequantize / Quantize pairs. The engine does not do that behind the user's back: such
a graph is refused, naming the op types; `float_ops=(...)` lets the user accept those
op types in fp32 (they are then named in the model's metadata), or engine='onnx'
serves the whole network in fp32.
"""

import contextlib
import inspect
import json
import logging
import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import numpy as np

from fgjax.export import onnx as onnx_lib

# Ops that move or name data without arithmetic: nothing to quantise in them.
_NO_ARITHMETIC = frozenset({"Identity"})
# Calibration runs in chunks of this many images (its graph returns only per-tensor
# min / max, so memory is the fp32 forward's).
_CALIBRATION_BATCH = 16
_MIN_ORT = "1.27"  # first onnxruntime whose quantize_static reads a calibration cache


class Int8Error(ValueError):
  """The int8 engine cannot serve a network, or a calibration does not fit it."""


def _quantization():
  try:
    from onnxruntime import quantization  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("engine='onnx-int8' needs onnx and onnxruntime: pip install "
                      f"'onnxruntime>={_MIN_ORT}' onnx") from e
  if "calibration_cache_path" not in inspect.signature(
      quantization.quantize_static).parameters:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    raise ImportError(f"engine='onnx-int8' needs onnxruntime>={_MIN_ORT} (its "
                      f"quantize_static reads stored calibrations); this is "
                      f"{onnxruntime.__version__}: pip install -U onnxruntime")
  return quantization


def quantizable_ops() -> frozenset[str]:
  """Op types onnxruntime's static quantiser turns into int8 (QDQ or QLinear)."""
  from onnxruntime.quantization import registry  # pylint: disable=g-import-not-at-top
  return frozenset(registry.QDQRegistry) | frozenset(registry.QLinearOpsRegistry)


def check_ops(model: Any, float_ops: Sequence[str], who: str) -> None:
  """Raises Int8Error if `model` has op types neither quantisable nor in float_ops."""
  allowed = quantizable_ops() | _NO_ARITHMETIC | set(float_ops)
  found = sorted({n.op_type for n in model.graph.node} - allowed)
  if found:
    raise Int8Error(
        f"engine='onnx-int8' cannot quantise {who}: onnxruntime has no int8 kernel "
        f"for op type(s) {', '.join(found)}, which would run in fp32 between "
        f"dequantise / quantise pairs. Choose: engine='onnx' (all fp32), or accept "
        f"them in fp32 with float_ops={tuple(found)!r} "
        f"(config.export.int8_float_ops when training exports the artifact).")


@contextlib.contextmanager
def _quiet():
  """Silences onnxruntime's advice to pre-process: fgjax's graph already has its
  convolutions folded and fused (fgjax.export.onnx_fusion)."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.setLevel(level)


def export_graph(module: nn.Module, variables: dict[str, Any], batch: int,
                 hw: tuple[int, int], outputs: Sequence[str]) -> Any:
  """The fp32 ONNX graph that the int8 and OpenVINO engines start from; a primitive
  the translation lacks raises OnnxExportError naming it and the fallback."""
  try:
    return onnx_lib.to_onnx(module, variables, (batch,) + tuple(hw) + (3,), outputs)
  except onnx_lib.UnsupportedPrimitive as e:
    raise onnx_lib.OnnxExportError(
        f"{type(module).__name__} cannot be exported to ONNX, which this engine "
        f"serves: {e} Use engine='xla' (XLA:CPU, fp32) instead.") from e


def calibrate(module: nn.Module, variables: dict[str, Any], images: np.ndarray,
              outputs: Sequence[str], float_ops: Sequence[str] = ()) -> dict[str, Any]:
  """MinMax ranges of every tensor the int8 graph quantises, from `images`.

  Args:
    module, variables: the BN-folded network (fgjax.export.fold, conv_impl='lax').
    images: (N, H, W, 3) float32, normalised as in evaluation; N >= 1. The ranges
      are min / max over exactly these images (the last chunk is filled with
      repeats of its own images, which changes no min or max).
    outputs: the graph outputs, e.g. ('embedding',).
    float_ops: op types accepted in fp32 (see check_ops).

  Returns:
    onnxruntime's calibration cache as a JSON-able dict; deterministic for given
    images (min and max do not depend on the order of reduction).
  """
  quantization = _quantization()
  images = np.ascontiguousarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
    raise ValueError(f"calibration images must be (N >= 1, H, W, 3), got "
                     f"{images.shape}.")
  batch = min(_CALIBRATION_BATCH, len(images))
  model = export_graph(module, variables, batch, images.shape[1:3], outputs)
  check_ops(model, float_ops, type(module).__name__)
  chunks = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    reps = -(-batch // len(chunk))
    chunks.append(np.concatenate([chunk] * reps)[:batch])

  class Reader(quantization.CalibrationDataReader):
    def __init__(self):
      self._it = iter(chunks)

    def get_next(self):
      chunk = next(self._it, None)
      return None if chunk is None else {onnx_lib.INPUT_NAME: chunk}

  with tempfile.TemporaryDirectory(prefix="fgjax_int8_") as tmp, _quiet():
    cache = os.path.join(tmp, "calibration.json")
    _quantize(quantization, model, os.path.join(tmp, "model.onnx"), cache, Reader())
    with open(cache) as f:
      return json.load(f)


def _quantize(quantization, model: Any, out: str, cache: str, reader: Any) -> None:
  quantization.quantize_static(
      model, out, reader, quant_format=quantization.QuantFormat.QDQ, per_channel=True,
      activation_type=quantization.QuantType.QUInt8,
      weight_type=quantization.QuantType.QInt8,
      calibrate_method=quantization.CalibrationMethod.MinMax,
      calibration_cache_path=cache)


def _check_fits(model: Any, calibration: dict[str, Any], who: str) -> None:
  """Int8Error unless the calibration names only tensors of `model` and covers the
  inputs / outputs of every op the quantiser will quantise."""
  data = calibration.get("data") if isinstance(calibration, dict) else None
  if not isinstance(data, dict) or not data:
    raise Int8Error(f"the int8 calibration of {who} is empty or not onnxruntime's "
                    "calibration cache; calibrate again (fgjax.export.int8.calibrate).")
  graph = model.graph
  consts = {t.name for t in graph.initializer}
  tensors = {t for n in graph.node for t in (*n.input, *n.output)} - consts
  need = {t for n in graph.node if n.op_type in quantizable_ops()
          for t in (*n.input, *n.output) if t and t not in consts}
  need.discard(onnx_lib.INPUT_NAME)
  stray = sorted(set(data) - tensors)
  missing = sorted(need - set(data))
  if stray or missing:
    example = (stray or missing)[0]
    raise Int8Error(
        f"the int8 calibration does not fit the ONNX graph of {who}: "
        f"{len(stray)} calibrated tensors are not in it and {len(missing)} quantised "
        f"tensors have no range (e.g. {example!r}). The network or fgjax's ONNX "
        "translation changed since calibration; calibrate again.")


def quantize(model: Any, calibration: dict[str, Any], float_ops: Sequence[str] = (),
             who: str = "the network") -> Any:
  """The QDQ int8 onnx.ModelProto of fp32 `model` from a stored calibration."""
  import onnx  # pylint: disable=g-import-not-at-top
  quantization = _quantization()
  check_ops(model, float_ops, who)
  _check_fits(model, calibration, who)
  with tempfile.TemporaryDirectory(prefix="fgjax_int8_") as tmp, _quiet():
    cache = os.path.join(tmp, "calibration.json")
    with open(cache, "w") as f:
      json.dump(calibration, f)
    out = os.path.join(tmp, "model.onnx")
    _quantize(quantization, model, out, cache, None)
    quantized = onnx.load(out)
  if float_ops:
    onnx.helper.set_model_props(quantized, {"fgjax.int8.float_ops": ",".join(
        sorted(float_ops))})
  return quantized


def make_forward(module: nn.Module, variables: dict[str, Any], batch_size: int,
                 outputs: Sequence[str], probe_hw: tuple[int, int],
                 calibration: dict[str, Any], float_ops: Sequence[str] = (),
                 threads: Optional[int] = None) -> Callable[[np.ndarray], dict]:
  """forward(chunk (batch_size, H, W, 3) float32) -> {name: np.ndarray}, int8.

  As fgjax.export.onnx.make_forward, with each exported graph quantised from
  `calibration` before its session is built; the one for `probe_hw` is built now, so
  a refusal (Int8Error, OnnxExportError) comes here, not at the first batch.
  """
  sessions: dict[tuple[int, int], Any] = {}
  names = list(outputs)
  who = type(module).__name__

  def get(hw):
    if hw not in sessions:
      fp32 = export_graph(module, variables, batch_size, hw, names)
      sessions[hw] = onnx_lib.session(quantize(fp32, calibration, float_ops, who),
                                      threads)
    return sessions[hw]

  get(tuple(probe_hw))

  def forward(chunk: np.ndarray) -> dict[str, np.ndarray]:
    res = get(tuple(chunk.shape[1:3])).run(names, {onnx_lib.INPUT_NAME: chunk})
    return dict(zip(names, res))

  return forward
