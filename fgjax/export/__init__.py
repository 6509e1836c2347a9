"""CPU serving of fgjax networks: BN folded, fixed batch, on XLA:CPU or ONNX Runtime.

Impostor networks exist to make light ConvNets accurate *and fast on CPU* (impostor
networks paper, sections 1 and 4.1). `make_cpu_predictor` serves any registered network
(fgjax.models.nets) or bare backbone (fgjax.models.registry) in eval mode:

  net = fgjax.models.nets.build(config.model, num_classes)
  predict = fgjax.export.make_cpu_predictor(
      net.module, variables, 32, outputs=('embedding', 'logits'),
      bn_epsilon=net.spec.bn_epsilon, engine='onnx', image_size=224)
  out = predict(images)   # normalised (N, 224, 224, 3) float -> {'embedding': (N, E),
                          #  'logits': (N, C)} as NumPy

  spec = fgjax.models.get('efficientnet_lite0', pretrained=True)   # a bare backbone
  feats = fgjax.export.make_cpu_predictor(spec, outputs=('pooled',))(images)['pooled']

Engines: 'xla' (fgjax.export.xla_predictor: XLA:CPU, BN folded, depthwise as shifted
multiply-adds; serves every network), 'onnx' (fgjax.export.onnx: the network
translated to ONNX and run by onnxruntime; on a 2-core CPU 1.6-2.4x faster than 'xla'
for EfficientNet-Lite0 / SqueezeNet, BENCHMARKS.md section 3) and 'onnx-int8'
(fgjax.export.int8: that graph statically quantised to int8 from a stored calibration,
`calibrate_int8`; BENCHMARKS.md section 13) and 'openvino' (fgjax.export.openvino: the
fp32 graph, or the int8 one, run by OpenVINO at an explicit `precision` - fp32, bf16 or
int8; an optional extra, the fastest here). A network an engine cannot express is
refused when the predictor is built (`OnnxExportError` naming the primitive,
`Int8Error` naming the op types), never silently served another way.

Both engines compile for a fixed batch size and run inputs in chunks of it, the last
one zero-padded, so any N works without recompiling.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.export import int8 as int8_lib
from fgjax.export import onnx as onnx_lib
from fgjax.export import openvino as openvino_lib
from fgjax.export import xla_predictor
from fgjax.export._common import output_names
from fgjax.export._common import select_outputs
from fgjax.export.int8 import Int8Error
from fgjax.export.onnx import OnnxExportError
from fgjax.export.onnx import to_onnx
from fgjax.export.onnx import UnsupportedPrimitive
from fgjax.models import layers

__all__ = ["ENGINES", "Int8Error", "OnnxExportError", "UnsupportedPrimitive",
           "calibrate_int8", "fold", "make_cpu_predictor", "to_onnx"]

ENGINES = ("xla", "onnx", "onnx-int8", "openvino")
# Spatial size the ONNX export is checked at when no image_size (or spec) gives one.
_PROBE_SIZE = 224


def _is_backbone(module: Any) -> bool:
  return hasattr(module, "fold_bn") and hasattr(module, "conv_impl")


def foldable(module: Any) -> bool:
  """Whether `fold` applies: a registry backbone, or a network whose backbone is one."""
  return _is_backbone(module) or _is_backbone(getattr(module, "backbone", None))


def fold(module: nn.Module, variables: dict[str, Any], bn_epsilon: Optional[float],
         conv_impl: str = "shifted") -> tuple[nn.Module, dict[str, Any]]:
  """The inference-only twin of a network or backbone: BN folded into convolutions.

  Args:
    module: a registry backbone (has `fold_bn` and `conv_impl` attributes), or a
      network (fgjax.models.nets) whose `backbone` is one; a network's backbone is
      cloned (`module.clone(backbone=...)`), its heads are unchanged.
    variables: its {'params', 'batch_stats'}.
    bn_epsilon: the backbone's BN epsilon (spec.bn_epsilon); None if it has no BN.
    conv_impl: the backbone's conv_impl: 'shifted' (depthwise as shifted
      multiply-adds, for XLA:CPU) or 'lax' (one lax conv each, for ONNX export).

  Returns:
    (module with fold_bn=True and `conv_impl`, {'params': folded}); every ConvBN's
    BatchNorm is folded (`fgjax.models.layers.fold_batch_norm`).
  """
  if _is_backbone(module):
    module = module.clone(fold_bn=True, conv_impl=conv_impl)
  elif _is_backbone(getattr(module, "backbone", None)):
    parts = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
             if f.name not in ("parent", "name") and _is_backbone(getattr(module, f.name))}
    module = module.clone(**{k: m.clone(fold_bn=True, conv_impl=conv_impl)
                             for k, m in parts.items()})
  else:
    raise TypeError(f"{type(module).__name__} is neither a fgjax.models backbone (with "
                    "fold_bn / conv_impl attributes) nor a network with one as "
                    "`backbone`; it cannot be BN-folded.")
  if variables.get("batch_stats"):
    if bn_epsilon is None:
      raise ValueError("variables have batch_stats but bn_epsilon is None; pass the "
                       "backbone's spec.bn_epsilon.")
    folded = layers.fold_batch_norm(variables, bn_epsilon)
  else:
    folded = {"params": variables["params"]}
  return module, jax.tree.map(jnp.asarray, folded)


def _resolve(target: Any, variables: Optional[dict[str, Any]],
             bn_epsilon: Optional[float]) -> tuple[nn.Module, dict[str, Any],
                                                   Optional[float], Optional[int]]:
  """(module, variables, bn_epsilon, input size) from a module, ModelSpec or Network."""
  if isinstance(target, nn.Module):
    module, spec = target, None
  elif isinstance(getattr(target, "module", None), nn.Module):
    module = target.module
    spec = getattr(target, "spec", target)  # nets.Network has .spec; ModelSpec is one
  else:
    raise TypeError(f"make_cpu_predictor serves a flax module, a ModelSpec or a "
                    f"nets.Network, got {type(target).__name__}.")
  if variables is None:
    variables = getattr(target, "variables", None)
    if variables is None:
      raise ValueError("pass `variables` when giving a module or a Network (only a "
                       "ModelSpec carries its own).")
  if bn_epsilon is None:
    bn_epsilon = getattr(spec, "bn_epsilon", None)
  return module, variables, bn_epsilon, getattr(spec, "input_size", None)


def _describe(module: nn.Module) -> str:
  pool = getattr(module, "pool", None)
  name = type(module).__name__
  return f"{name}(pool={type(pool).__name__})" if pool is not None else name


def check_images(images: Any) -> np.ndarray:
  """(N, H, W, 3) float images as contiguous float32, N >= 1, else a clear error."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"predict expects (N, H, W, 3) images, got {images.shape}.")
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"predict expects normalised float images, got {images.dtype}.")
  if images.shape[0] == 0:
    raise ValueError("predict got an empty batch.")
  return np.ascontiguousarray(images, np.float32)


def chunked(forward: Callable[[np.ndarray], dict[str, np.ndarray]], batch_size: int,
            names: Sequence[str]) -> Callable[[Any], dict[str, np.ndarray]]:
  """predict(images) running `forward` on fixed-size chunks, the last one zero-padded.

  `forward` takes (batch_size, H, W, 3) float32 and returns {name: (batch_size, ...)};
  predict returns {name: (N, ...)} for exactly `names`.
  """

  def predict(images: Any) -> dict[str, np.ndarray]:
    images = check_images(images)
    n = images.shape[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      m = chunk.shape[0]
      if m < batch_size:
        pad = np.zeros((batch_size - m,) + chunk.shape[1:], np.float32)
        chunk = np.concatenate([chunk, pad])
      out = forward(chunk)
      for k in names:
        parts[k].append(out[k][:m])
    return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}

  return predict


def make_cpu_predictor(module: Any, variables: Optional[dict[str, Any]] = None,
                       batch_size: int = 32, *, outputs: Union[str, Sequence[str]],
                       bn_epsilon: Optional[float] = None, engine: str = "xla",
                       device: Optional[jax.Device] = None,
                       image_size: Union[None, int, tuple[int, int]] = None,
                       int8_calibration: Optional[dict[str, Any]] = None,
                       float_ops: Sequence[str] = (), precision: str = "fp32"
                       ) -> Callable[[Any], dict[str, np.ndarray]]:
  """Returns predict(images) -> {name: np.ndarray} running `module` in eval mode on CPU.

  Args:
    module: a network module (fgjax.models.nets; its backbone is BN-folded), a bare
      registry backbone (BN-folded), a `ModelSpec` or a `nets.Network` (then
      `variables` / `bn_epsilon` default from it), or any flax module called as
      apply(variables, x, train=False) that returns a dict (run as it is).
    variables: {'params', 'batch_stats'}; defaults to spec.variables for a ModelSpec.
    batch_size: the compiled batch size; inputs run in chunks of it (the last one
      zero-padded), so any N works without recompiling.
    outputs: names of the module's outputs to return, e.g. ('embedding', 'logits')
      or ('pooled',); only these are computed.
    bn_epsilon: BN epsilon for folding (spec.bn_epsilon); defaults to the spec's.
    engine: 'xla' (XLA:CPU on `device`), 'onnx' (onnxruntime on the host CPU; no
      `device`), 'onnx-int8' (the same graph quantised from `int8_calibration`) or
      'openvino' (OpenVINO at `precision`).
    device: for 'xla': where to run; default the first CPU device.
    image_size: input side (int or (H, W)) to build for now: 'xla' compiles it, 'onnx'
      exports it. Other sizes are built on first use. Without it 'onnx' still exports
      once now, at the spec's input size (224 for a plain module), to refuse what it
      cannot serve here rather than at the first call.
    int8_calibration: for 'onnx-int8' and 'openvino' at precision 'int8': the ranges
      from `calibrate_int8` (an artifact stores them); required there, refused
      elsewhere.
    float_ops: with int8: op types without int8 kernels the user accepts in fp32
      (fgjax.export.int8.check_ops names them when it refuses).
    precision: for 'openvino': 'fp32' (default), 'bf16' or 'int8'.

  Returns:
    predict(images): images (N, H, W, 3) float, normalised like spec.mean / spec.std
    -> {name: (N, ...) np.ndarray} for exactly `outputs`.

  Raises:
    OnnxExportError (a ValueError): engine='onnx' and the network needs a primitive
      the ONNX translation has no rule for; the message names the network, the
      primitive and the fallback engine='xla'.
    Int8Error (a ValueError): engine='onnx-int8' and the graph has op types without
      int8 kernels not listed in `float_ops`, or the calibration does not fit it.
  """
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got "
                     f"{engine!r}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
  batch_size = int(batch_size)
  if engine != "xla" and device is not None:
    raise ValueError(f"engine={engine!r} runs on the host CPU through onnxruntime; "
                     "leave device=None, or use engine='xla' to pick a device.")
  if engine != "openvino" and precision != "fp32":
    raise ValueError(f"precision={precision!r} is a parameter of engine='openvino'; "
                     f"engine={engine!r} has one precision (use 'onnx-int8' for int8).")
  int8 = engine == "onnx-int8" or (engine == "openvino" and precision == "int8")
  if int8 != (int8_calibration is not None):
    raise ValueError(f"engine={engine!r} at precision {precision!r} needs "
                     "int8_calibration (from calibrate_int8 or an artifact)." if int8
                     else f"int8_calibration is for int8 engines ('onnx-int8', "
                     f"'openvino' at precision 'int8'), not {engine!r} at {precision!r}.")
  names = output_names(outputs)
  module, variables, bn_epsilon, spec_size = _resolve(module, variables, bn_epsilon)
  if isinstance(image_size, (int, np.integer)):
    image_size = (int(image_size), int(image_size))
  hw = tuple(image_size) if image_size is not None else None
  who = _describe(module)
  if foldable(module):
    module, variables = fold(module, variables, bn_epsilon,
                             conv_impl="shifted" if engine == "xla" else "lax")
  else:
    variables = jax.tree.map(jnp.asarray, dict(variables))

  if engine == "xla":
    if hw is None:  # Check the output names now (abstractly, nothing compiles).
      side = spec_size or _PROBE_SIZE
      probe = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
      jax.eval_shape(lambda v, x: select_outputs(
          module.apply(v, x, train=False), names, who), variables, probe)
    forward = xla_predictor.make_forward(module, variables, batch_size, names, device,
                                         hw)
  elif engine == "onnx-int8":
    forward = int8_lib.make_forward(module, variables, batch_size, names,
                                    hw or (spec_size or _PROBE_SIZE,) * 2,
                                    int8_calibration, float_ops)
  elif engine == "openvino":
    forward = openvino_lib.make_forward(module, variables, batch_size, names,
                                        hw or (spec_size or _PROBE_SIZE,) * 2,
                                        precision, int8_calibration, float_ops)
  else:
    probe_hw = hw or (spec_size or _PROBE_SIZE,) * 2
    try:
      forward = onnx_lib.make_forward(module, variables, batch_size, names, probe_hw)
    except UnsupportedPrimitive as e:
      raise OnnxExportError(
          f"engine='onnx' cannot serve {who}: {e} Use engine='xla' (XLA:CPU, serves "
          "every network), or engine='jit' for a fgjax.artifact.Model.") from e
  return chunked(forward, batch_size, names)


def calibrate_int8(module: Any, variables: Optional[dict[str, Any]] = None, *,
                   images: Any, outputs: Union[str, Sequence[str]],
                   bn_epsilon: Optional[float] = None,
                   float_ops: Sequence[str] = ()) -> dict[str, Any]:
  """The int8 calibration of a network for engine='onnx-int8', from `images`.

  Args:
    module, variables, bn_epsilon: as for make_cpu_predictor (folded here).
    images: (N, H, W, 3) float, normalised as in evaluation: the images whose
      activation ranges the int8 graph keeps (training exports use the run's own
      training images, fgjax.train).
    outputs: the outputs the predictor will return, e.g. ('embedding',).
    float_ops: op types accepted in fp32 (see fgjax.export.int8.check_ops).

  Returns:
    A JSON-able dict (onnxruntime's calibration cache) for make_cpu_predictor's
    `int8_calibration`; deterministic for given images.
  """
  module, variables, bn_epsilon, _ = _resolve(module, variables, bn_epsilon)
  if foldable(module):
    module, variables = fold(module, variables, bn_epsilon, conv_impl="lax")
  return int8_lib.calibrate(module, variables, check_images(images),
                            output_names(outputs), float_ops)
