"""Layers shared by the backbones: conv with TF/PyTorch padding, depthwise conv, ConvBN.

The backbones are ports of PyTorch models whose pretrained weights we load, so the
layers reproduce PyTorch / TensorFlow numerics exactly (padding conventions, BN epsilon,
ceil-mode pooling) while staying fast on XLA:CPU:

* `Conv2D` with `groups='depthwise'` computes a depthwise convolution as k*k shifted
  multiply-adds on CPU. XLA:CPU lowers grouped convolutions (feature_group_count=C) to a
  slow generic loop (about 6x slower than the fused elementwise form measured on
  EfficientNet-Lite0), while on GPU/TPU the grouped convolution is the fast path. The
  choice is made at trace time from the default backend, so the same params run on both.
  Its gradient is hand-written (`cpu_ops.depthwise_conv_shifted` is a
  `jax.custom_vjp`): plain autodiff made XLA:CPU materialise all k*k shifted copies of
  the activations.
* An unpadded 1x1 `Conv2D` is a matmul over (N*H*W, C) (`cpu_ops.pointwise_conv`):
  XLA:CPU runs 1x1 convolutions and their gradients through generic convolution kernels
  plus transposes, 3-10x slower than the GEMM.
* Max pooling on CPU is a max over shifted slices with a hand-written gradient
  (`max_pool_torch`), since XLA:CPU's select-and-scatter is slow.
* `ConvReluMaxPool` (SqueezeNet's stem) pools before the bias and ReLU, and takes its
  kernel gradient without the full-resolution gradient (`cpu_ops.conv_max_pool`).
* `conv_impl='lax'` turns these rewrites off (every convolution is one
  lax.conv_general_dilated, pooling is reduce_window), which is what the ONNX exporter
  translates.
* `ConvBN` is a convolution followed by BatchNorm; on the shifted (CPU) path that is
  `batch_norm.BatchNorm`, flax's BatchNorm with a hand-written training gradient. With `folded=True` the BN is folded into
  the convolution (kernel * gamma / sqrt(var + eps), bias = beta - mean * gamma /
  sqrt(var + eps)), which is what `fgjax.export` uses for CPU inference;
  `fold_batch_norm` converts a variables tree accordingly.
"""

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.models import batch_norm, cpu_ops

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



def use_shifted_kernels(impl: str) -> bool:
  if impl == "auto":
    return jax.default_backend() == "cpu"
  if impl not in ("shifted", "lax"):
    raise ValueError(f"conv_impl={impl!r}: expected 'auto', 'shifted' or 'lax'.")
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
    conv_impl: 'auto' (depthwise as shifted multiply-adds on CPU, grouped lax conv
      elsewhere; unpadded 1x1 as a matmul everywhere), 'shifted' (shifted depthwise on
      every backend) or 'lax' (every convolution a lax.conv_general_dilated).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = 0
  groups: Union[int, str] = 1
  use_bias: bool = False
  conv_impl: str = "auto"
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
    shifted = use_shifted_kernels(self.conv_impl)  # also validates conv_impl
    if depthwise and shifted:
      y = cpu_ops.depthwise_conv_shifted(x, kernel, self.strides, pads)
    elif (k == 1 and not depthwise and self.conv_impl != "lax"
          and not any(map(any, pads))):
      y = cpu_ops.pointwise_conv(x, kernel[0, 0], self.strides)
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
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Conv2D(self.features, self.kernel_size, self.strides, self.padding, self.groups,
               use_bias=self.folded, conv_impl=self.conv_impl,
               dtype=self.dtype, name="conv")(x)
    if self.folded:
      if train:
        raise ValueError("A BN-folded network is for inference only: call it with "
                         "train=False, or build it with fold_bn=False to train.")
      return x
    if use_shifted_kernels(self.conv_impl):
      # Same variables and values; a three-pass training gradient (see batch_norm).
      return batch_norm.BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype,
                                  name="bn")(x, use_running_average=not train)
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)


def max_pool_torch(x: jax.Array, kernel: int, stride: int, padding: int = 0,
                   ceil_mode: bool = False, impl: str = "auto") -> jax.Array:
  """torch.nn.MaxPool2d on NHWC input (padding with -inf, optional ceil mode).

  `impl` as Conv2D's `conv_impl`: 'auto' / 'shifted' take the max of k*k shifted
  slices with a hand-written gradient (`cpu_ops.max_pool_shifted`, PyTorch's
  first-maximum rule) on CPU; 'lax' (and 'auto' off CPU) is flax's reduce_window max
  pool.
  """
  if use_shifted_kernels(impl) and jnp.issubdtype(x.dtype, jnp.floating):
    return cpu_ops.max_pool_shifted(x, kernel, stride, padding, ceil_mode)
  pads, _ = cpu_ops.pool_geometry(x.shape[1:3], kernel, stride, padding, ceil_mode)
  return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


class ConvReluMaxPool(nn.Module):
  """max_pool(relu(conv(x) + bias)): a network stem, params as Conv2D(use_bias=True).

  On the shifted (CPU) path it computes relu(cpu_ops.conv_max_pool(x, kernel) + bias):
  bias and ReLU commute with the max (and the first-maximum gradient is unchanged), so
  they run on the pooled map, and the kernel gradient skips the full-resolution
  gradient (see `cpu_ops.conv_max_pool`). With conv_impl='lax' it is the plain
  sequence, which ONNX export keeps as a fusable Conv + Relu.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = 0
  pool_kernel: int = 3
  pool_stride: int = 2
  pool_padding: int = 0
  ceil_mode: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  kernel_init: Any = conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    pool = (self.pool_kernel, self.pool_stride, self.pool_padding, self.ceil_mode)
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    pads = _pads(self.padding, x.shape, k, self.strides)
    if use_shifted_kernels(self.conv_impl):
      y = cpu_ops.conv_max_pool(x, kernel, self.strides, pads, *pool)
      return nn.relu(y + bias)
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return max_pool_torch(nn.relu(y + bias), *pool, impl=self.conv_impl)


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


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
