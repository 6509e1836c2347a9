"""Layers shared by the backbones: conv with TF/PyTorch padding, depthwise conv, ConvBN.

The backbones are ports of PyTorch models whose pretrained weights we load, so the
layers reproduce PyTorch / TensorFlow numerics exactly (padding conventions, BN epsilon,
ceil-mode pooling) while staying fast on XLA:CPU:

* `Conv2D` with `groups='depthwise'` computes a depthwise convolution as k*k shifted
  multiply-adds on CPU. XLA:CPU lowers grouped convolutions (feature_group_count=C) to a
  slow generic loop (about 6x slower than the fused elementwise form measured on
  EfficientNet-Lite0), while on GPU/TPU the grouped convolution is the fast path. The
  choice is made at trace time from the default backend, so the same params run on both.
* `ConvBN` is a convolution followed by BatchNorm. With `folded=True` the BN is folded into
  the convolution (kernel * gamma / sqrt(var + eps), bias = beta - mean * gamma /
  sqrt(var + eps)), which is what `fgjax.models.inference` uses for CPU inference;
  `fold_batch_norm` converts a variables tree accordingly.
"""

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = Union[str, int]

# torchvision initialises convolutions with kaiming_normal(mode='fan_out', relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding (lo, hi) for one spatial dim of static size `size`.

  out = ceil(size / stride); total = max((out - 1) * stride + kernel - size, 0); the odd
  pixel goes to the end (bottom/right). This is what EfficientNet's TF reference and
  efficientnet-lite-pytorch's Conv2d*SamePadding compute, and it differs from a symmetric
  PyTorch padding for stride 2.
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pads(padding: Padding, shape: Sequence[int], kernel: int,
          stride: int) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    if padding.lower() != "tf_same":
      raise ValueError(f"padding={padding!r}: expected 'tf_same' or an int.")
    return [tf_same_padding(shape[1], kernel, stride),
            tf_same_padding(shape[2], kernel, stride)]
  return [(padding, padding), (padding, padding)]


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution as a sum of k*k shifted, strided slices times per-channel taps.

  Args:
    x: (N, H, W, C) input.
    kernel: (kh, kw, 1, C) taps, flax HWIO layout with one input channel per group.
    stride: spatial stride.
    pads: ((top, bottom), (left, right)) zero padding.

  Returns:
    (N, Ho, Wo, C), equal to lax.conv_general_dilated(..., feature_group_count=C).
  """
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def use_shifted_depthwise(impl: str) -> bool:
  if impl == "auto":
    return jax.default_backend() == "cpu"
  if impl not in ("shifted", "lax"):
    raise ValueError(f"depthwise_impl={impl!r}: expected 'auto', 'shifted' or 'lax'.")
  return impl == "shifted"


class Conv2D(nn.Module):
  """NHWC 2-D convolution with PyTorch-compatible params (HWIO kernel, optional bias).

  Attributes:
    features: output channels (must equal input channels when groups='depthwise').
    kernel_size: square kernel side.
    strides: square stride.
    padding: 'tf_same' (TensorFlow SAME, computed from the static input shape) or an int
      (symmetric zero padding, as torch.nn.Conv2d(padding=p)).
    groups: 1 or 'depthwise'.
    use_bias: whether to add a bias.
    depthwise_impl: 'auto' (shifted multiply-adds on CPU, grouped lax conv elsewhere),
      'shifted' or 'lax'.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = 0
  groups: Union[int, str] = 1
  use_bias: bool = False
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32
  kernel_init: Any = conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    depthwise = self.groups == "depthwise"
    if depthwise and cin != self.features:
      raise ValueError(f"depthwise Conv2D needs features == input channels, got "
                       f"{self.features} and {cin}.")
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, 1 if depthwise else cin, self.features), jnp.float32)
    pads = _pads(self.padding, x.shape, k, self.strides)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if depthwise and use_shifted_depthwise(self.depthwise_impl):
      y = depthwise_conv_shifted(x, kernel, self.strides, pads)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=cin if depthwise else 1)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


class ConvBN(nn.Module):
  """Conv2D (no bias) + BatchNorm, or the BN-folded Conv2D (with bias) when `folded`.

  Submodule names 'conv' and 'bn' are what `fold_batch_norm` and the .pth key maps use.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = 0
  groups: Union[int, str] = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  folded: bool = False
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Conv2D(self.features, self.kernel_size, self.strides, self.padding, self.groups,
               use_bias=self.folded, depthwise_impl=self.depthwise_impl,
               dtype=self.dtype, name="conv")(x)
    if self.folded:
      if train:
        raise ValueError("A BN-folded network is for inference only: call it with "
                         "train=False, or build it with fold_bn=False to train.")
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)


def max_pool_torch(x: jax.Array, kernel: int, stride: int, padding: int = 0,
                   ceil_mode: bool = False) -> jax.Array:
  """torch.nn.MaxPool2d on NHWC input (padding with -inf, optional ceil mode)."""
  pads = []
  for size in x.shape[1:3]:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start entirely in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
      out -= 1
    hi = (out - 1) * stride + kernel - size - padding
    pads.append((padding, max(hi, 0)))
  return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C)."""
  return jnp.mean(x, axis=(1, 2))


def fold_batch_norm(variables: dict[str, Any], epsilon: float) -> dict[str, Any]:
  """Folds every ConvBN's BatchNorm into its convolution (for `ConvBN(folded=True)`).

  For BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta after y = conv(x, W):
  W' = W * gamma / sqrt(var + eps) per output channel and b' = beta - mean * gamma /
  sqrt(var + eps) (Ioffe & Szegedy 2015, Alg. 2, inference form). Computed in float64
  on the host, then cast to float32.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a network built of ConvBN units.
    epsilon: the BN epsilon the network uses (1e-3 for EfficientNet, 1e-5 torchvision).

  Returns:
    {'params': ...} for the same network built with fold_bn=True.
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})

  def walk(p, s):
    out = {}
    for name, sub in p.items():
      if not isinstance(sub, dict) and not hasattr(sub, "items"):
        out[name] = sub
        continue
      sub_stats = s.get(name, {}) if s else {}
      if "conv" in sub and "bn" in sub:
        kernel = np.asarray(sub["conv"]["kernel"], np.float64)
        gamma = np.asarray(sub["bn"]["scale"], np.float64)
        beta = np.asarray(sub["bn"]["bias"], np.float64)
        mean = np.asarray(sub_stats["bn"]["mean"], np.float64)
        var = np.asarray(sub_stats["bn"]["var"], np.float64)
        inv = gamma / np.sqrt(var + epsilon)
        folded = {"kernel": (kernel * inv).astype(np.float32),
                  "bias": (beta - mean * inv).astype(np.float32)}
        rest = {k: v for k, v in sub.items() if k not in ("conv", "bn")}
        out[name] = {"conv": folded, **walk(rest, sub_stats)}
      else:
        out[name] = walk(sub, sub_stats)
    return out

  return {"params": walk(params, stats)}


def num_params(tree: Any) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def check_images(x: jax.Array, name: str, min_side: Optional[int] = None) -> None:
  """Trace-time check that `x` is a float NHWC batch with 3 channels."""
  if getattr(x, "ndim", None) != 4 or x.shape[-1] != 3:
    raise ValueError(f"{name} expects images of shape (N, H, W, 3) (NHWC, normalised), "
                     f"got shape {getattr(x, 'shape', None)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} expects floating-point images (normalised pixels), got "
                    f"dtype {x.dtype}; convert with (x - spec.mean) / spec.std.")
  if min_side is not None and min(x.shape[1:3]) < min_side:
    raise ValueError(f"{name} needs spatial size >= {min_side}, got {x.shape[1:3]}.")
