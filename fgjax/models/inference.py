"""Fast CPU inference for the backbones: BN folding + shifted depthwise conv + fixed-batch jit.

Impostor networks exist to make light ConvNets accurate *and fast on CPU* (impostor
networks paper, sections 1 and 4.1). On XLA:CPU the two things that matter for
EfficientNet-Lite0 are (i) depthwise convolutions, which XLA lowers to a slow grouped
convolution; we compute them as k*k shifted multiply-adds that XLA fuses into one loop
(layers.depthwise_conv_shifted), and (ii) BatchNorm, which we fold into the preceding
convolution (layers.fold_batch_norm), removing a pass over every activation. The
predictor compiles once for a fixed batch size and pads the last partial batch, so
serving never recompiles.

  spec = fgjax.models.get('efficientnet_lite0', pretrained=True)
  predict = make_cpu_predictor(spec, batch_size=32)
  feats = predict(images)  # (N, 224, 224, 3) normalised float32 -> (N, 1280) np.ndarray
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.models import layers


def fold(module: nn.Module, variables: dict[str, Any],
         bn_epsilon: Optional[float]) -> tuple[nn.Module, dict[str, Any]]:
  """The inference-only twin of a backbone: BN folded, depthwise as shifted MACs.

  Args:
    module: a registry backbone (has `fold_bn` and `depthwise_impl` attributes).
    variables: its {'params', 'batch_stats'}.
    bn_epsilon: the backbone's BN epsilon (spec.bn_epsilon); None if it has no BN.

  Returns:
    (module with fold_bn=True and depthwise_impl='shifted', {'params': folded}).
  """
  if not (hasattr(module, "fold_bn") and hasattr(module, "depthwise_impl")):
    raise TypeError(f"{type(module).__name__} is not a fgjax.models backbone (it has no "
                    "fold_bn / depthwise_impl attributes); pass fold_bn=False.")
  if variables.get("batch_stats"):
    if bn_epsilon is None:
      raise ValueError("variables have batch_stats but bn_epsilon is None.")
    folded = layers.fold_batch_norm(variables, bn_epsilon)
  else:
    folded = {"params": variables["params"]}
  folded = jax.tree.map(jnp.asarray, folded)
  return module.clone(fold_bn=True, depthwise_impl="shifted"), folded


def make_cpu_predictor(spec_or_module: Any, variables: Optional[dict[str, Any]] = None,
                       batch_size: int = 32, *, bn_epsilon: Optional[float] = None,
                       fold_bn: bool = True,
                       device: Optional[jax.Device] = None) -> Callable[[Any], np.ndarray]:
  """Returns predict(images) -> np.ndarray running the backbone in eval mode on CPU.

  Args:
    spec_or_module: a `fgjax.models.ModelSpec`, or a flax module (then pass
      `variables`, and `bn_epsilon` if it has BatchNorm).
    variables: {'params', 'batch_stats'}; defaults to spec.variables.
    batch_size: the compiled batch size; inputs are processed in chunks of this size
      (the last one zero-padded), so any N works without recompiling.
    bn_epsilon: BN epsilon for folding; defaults to spec.bn_epsilon.
    fold_bn: fold BN into convolutions (registry backbones only).
    device: where to run; default the first CPU device.

  Returns:
    predict(images): images (N, H, W, 3) float32, normalised like spec.mean/std ->
    (N, ...) outputs of module.apply(variables, images, train=False), as NumPy.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  module = getattr(spec_or_module, "module", spec_or_module)
  if variables is None:
    if not hasattr(spec_or_module, "variables"):
      raise ValueError("pass `variables` when giving a module instead of a ModelSpec.")
    variables = spec_or_module.variables
  if bn_epsilon is None:
    bn_epsilon = getattr(spec_or_module, "bn_epsilon", None)
  if fold_bn:
    module, variables = fold(module, variables, bn_epsilon)
  device = device or jax.devices("cpu")[0]
  variables = jax.device_put(variables, device)
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False))

  def predict(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"predict expects (N, H, W, 3) images, got {images.shape}.")
    if not np.issubdtype(images.dtype, np.floating):
      raise TypeError(f"predict expects normalised float images, got {images.dtype}.")
    images = images.astype(np.float32, copy=False)
    n = images.shape[0]
    outs = []
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      if chunk.shape[0] < batch_size:
        pad = np.zeros((batch_size - chunk.shape[0],) + chunk.shape[1:], np.float32)
        chunk = np.concatenate([chunk, pad])
      out = forward(variables, jax.device_put(chunk, device))
      outs.append(np.asarray(out)[:min(batch_size, n - start)])
    if not outs:
      raise ValueError("predict got an empty batch.")
    return np.concatenate(outs)

  return predict
