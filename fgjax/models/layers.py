"""Layers shared by the backbones: conv with TF/PyTorch padding, depthwise conv, ConvBN.

The backbones are ports of PyTorch models whose pretrained weights we load, so the
layers reproduce PyTorch / TensorFlow numerics exactly (padding conventions, BN epsilon,
ceil-mode pooling) while staying fast on XLA:CPU:

* `Conv2D` with `groups='depthwise'` computes a depthwise convolution as k*k shifted
  multiply-adds on CPU. XLA:CPU lowers grouped convolutions (feature_group_count=C) to a
  slow generic loop (about 6x slower than the fused elementwise form measured on
  EfficientNet-Lite0), while on GPU/TPU the grouped convolution is the fast path. The
  choice is made at trace time from the default backend, so the same params run on both.
  Its gradient is hand-written (`depthwise_conv_shifted` is a `jax.custom_vjp`): plain
  autodiff made XLA:CPU materialise all k*k shifted copies of the activations.
* An unpadded 1x1 `Conv2D` is a matmul over (N*H*W, C) (`pointwise_conv`): XLA:CPU runs
  1x1 convolutions and their gradients through generic convolution kernels plus
  transposes, 3-10x slower than the GEMM.
* Max pooling on CPU is a max over shifted slices with a hand-written gradient
  (`max_pool_torch`), since XLA:CPU's select-and-scatter is slow.
* `conv_impl='lax'` turns these rewrites off (every convolution is one
  lax.conv_general_dilated, pooling is reduce_window), which is what the ONNX exporter
  translates.
* `ConvBN` is a convolution followed by BatchNorm. With `folded=True` the BN is folded into
  the convolution (kernel * gamma / sqrt(var + eps), bias = beta - mean * gamma /
  sqrt(var + eps)), which is what `fgjax.models.inference` uses for CPU inference;
  `fold_batch_norm` converts a variables tree accordingly.
"""

import functools
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


def _shifted_slices(xp: jax.Array, kh: int, kw: int, stride: int,
                    out_hw: tuple[int, int]):
  """Yields ((i, j), tap) for the kh*kw window taps of padded xp: the (N, Ho, Wo, C)
  strided slice starting at row i, column j. `_add_taps` is its transpose."""
  ho, wo = out_hw
  for i in range(kh):
    for j in range(kw):
      yield (i, j), jax.lax.slice(
          xp, (0, i, j, 0),
          (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
           xp.shape[3]),
          (1, stride, stride, 1))


def _depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int,
                       pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_hw = ((x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1)
  out = None
  for (i, j), tap in _shifted_slices(x, kh, kw, stride, out_hw):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _add_taps(terms: dict, stride: int, pads, in_hw) -> jax.Array:
  """The transpose of taking k*k shifted strided slices: sum_ij place(terms[i, j]).

  terms[i, j] is an (N, Ho, Wo, C) array whose element (y, x) belongs to input position
  (i - top + stride * y, j - left + stride * x); positions in the padding are dropped.
  Stride 1 pads each term into place (XLA fuses the sum into one loop). A larger stride
  sums each polyphase component (taps with equal i % s, j % s) densely, then
  interleaves the s*s components: zero-interleaved pads of every term were each written
  to memory by XLA:CPU.
  """
  (pt, _), (pl, _) = pads
  h, w = in_hw
  s = stride
  some = next(iter(terms.values()))
  n, ho, wo, c = some.shape
  zero = jnp.zeros((), some.dtype)
  if s == 1:
    out = None
    for (i, j), t in terms.items():
      t = jax.lax.pad(t, zero, ((0, 0, 0), (i - pt, h - (i - pt) - ho, 0),
                                (j - pl, w - (j - pl) - wo, 0), (0, 0, 0)))
      out = t if out is None else out + t
    return out
  kh = 1 + max(i for i, _ in terms)
  kw = 1 + max(j for _, j in terms)
  hq = max((kh - 1) // s + ho, -(-(pt + h) // s))
  wq = max((kw - 1) // s + wo, -(-(pl + w) // s))
  phases = {}
  for (i, j), t in terms.items():
    u, v = i // s, j // s
    t = jax.lax.pad(t, zero, ((0, 0, 0), (u, hq - u - ho, 0), (v, wq - v - wo, 0),
                              (0, 0, 0)))
    key = (i % s, j % s)
    phases[key] = t if key not in phases else phases[key] + t
  empty = jnp.zeros((n, hq, wq, c), some.dtype)
  rows = [jnp.stack([phases.get((a, b), empty) for b in range(s)], axis=3)
          for a in range(s)]
  full = jnp.stack(rows, axis=2).reshape(n, hq * s, wq * s, c)
  return full[:, pt:pt + h, pl:pl + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, stride, pads):
  return _depthwise_forward(x, kernel, stride, pads)


def _depthwise_fwd(x, kernel, stride, pads):
  return _depthwise_forward(x, kernel, stride, pads), (x, kernel)


def _depthwise_bwd(stride, pads, residuals, g):
  """Input and kernel gradients of the shifted depthwise conv, each a single pass.

  Why hand-written: autodiff of the k*k slices saves each shifted slice as a residual,
  and XLA:CPU writes all k*k of them to memory (25 copies of the activations for a 5x5
  layer). Here no expression is shared between the forward and the two gradients, so
  every term fuses into its consumer:
    dx = sum_ij (g placed at offset (i, j), dilated by the stride, cropped to H x W) * k_ij
    dk_ij = sum_{n,y,x} phase(x_pad)[n, y, x] * (g placed at offset (i//s, j//s))
  where phase = x_pad[:, i % s::s, j % s::s] is a polyphase component, so the kernel
  gradient of a strided conv multiplies dense arrays (no zero-interleaved g).
  """
  x, kernel = residuals
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = pads
  s = stride
  ho, wo = g.shape[1:3]
  hq = -(-(h + sum(pads[0])) // s)
  wq = -(-(w + sum(pads[1])) // s)
  zero = jnp.zeros((), g.dtype)
  xp = jnp.pad(x, ((0, 0), (pt, hq * s - h - pt), (pl, wq * s - w - pl), (0, 0)))
  dk = {}
  for a in range(min(s, kh)):
    for b in range(min(s, kw)):
      phase = xp[:, a::s, b::s, :] if s > 1 else xp
      for i in range(a, kh, s):
        for j in range(b, kw, s):
          u, v = i // s, j // s
          g_at = jax.lax.pad(g, zero, ((0, 0, 0), (u, hq - u - ho, 0),
                                       (v, wq - v - wo, 0), (0, 0, 0)))
          dk[i, j] = jnp.sum(phase * g_at, axis=(0, 1, 2))
  dx = _add_taps({(i, j): g * kernel[i, j, 0] for i in range(kh) for j in range(kw)},
                 s, pads, (h, w))
  dk = jnp.stack([dk[i, j] for i in range(kh) for j in range(kw)])
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution as a sum of k*k shifted, strided slices times per-channel taps.

  Differentiable in x and kernel through a custom VJP (see `_depthwise_bwd`).

  Args:
    x: (N, H, W, C) input.
    kernel: (kh, kw, 1, C) taps, flax HWIO layout with one input channel per group.
    stride: spatial stride.
    pads: ((top, bottom), (left, right)) zero padding.

  Returns:
    (N, Ho, Wo, C), equal to lax.conv_general_dilated(..., feature_group_count=C).
  """
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _depthwise(x, kernel, int(stride), pads)


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """1x1 convolution as one matmul over the flattened (N*H*W, C) activations.

  Args:
    x: (N, H, W, C) input.
    kernel: (C, O) weights (a 1x1 HWIO kernel without its spatial dims).
    stride: spatial stride (applied as a strided slice first).

  Returns:
    (N, ceil(H / stride), ceil(W / stride), O), equal to the unpadded 1x1
    lax.conv_general_dilated.

  Why: XLA:CPU lowers a 1x1 convolution and, worse, its two gradients to generic
  convolution kernels plus transposes of the activations; the same contraction written
  as a dot runs as a plain GEMM. Measured on the 2-core VM (batch 32, 112x112):
  96->16 channels forward 87 ms -> 8 ms, forward + both gradients 400 ms -> 95 ms
  (BENCHMARKS.md section 3). On GPU/TPU a dot is what the 1x1 convolution becomes anyway.
  """
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel)
  return y.reshape(n, h, w, kernel.shape[-1])


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
      y = depthwise_conv_shifted(x, kernel, self.strides, pads)
    elif (k == 1 and not depthwise and self.conv_impl != "lax"
          and not any(map(any, pads))):
      y = pointwise_conv(x, kernel[0, 0], self.strides)
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
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)


def _max_pool_taps(x, kernel, stride, pads, out_hw):
  lowest = jnp.array(-jnp.inf, x.dtype)
  xp = jax.lax.pad(x, lowest, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  for _, tap in _shifted_slices(xp, kernel, kernel, stride, out_hw):
    yield tap


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _max_pool_shifted(x, kernel, stride, pads, out_hw, in_hw):
  out = None
  for tap in _max_pool_taps(x, kernel, stride, pads, out_hw):
    out = tap if out is None else jnp.maximum(out, tap)
  return out


def _max_pool_fwd(x, kernel, stride, pads, out_hw, in_hw):
  """The max and, per output, the index of the first maximal tap (row-major window)."""
  out = arg = None
  for t, tap in enumerate(_max_pool_taps(x, kernel, stride, pads, out_hw)):
    if out is None:
      out, arg = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      better = tap > out  # strict: ties keep the earlier tap
      out = jnp.where(better, tap, out)
      arg = jnp.where(better, jnp.int8(t), arg)
  return out, arg


def _max_pool_bwd(kernel, stride, pads, out_hw, in_hw, residuals, g):
  """Routes each output's gradient to the first maximal tap in row-major window order.

  That is PyTorch's rule (its CPU kernel keeps the first maximum), and it differs from
  autodiff of a max chain, which splits ties. Why hand-written: XLA:CPU lowers the
  gradient of reduce_window max (select_and_scatter) through iota/index tuples and a
  scatter, about 0.3 s per pooling layer of SqueezeNet at batch 32; here the forward
  keeps an int8 tap index and the gradient is selects summed per polyphase
  component (`_add_taps`).
  """
  del out_hw  # g has that shape
  arg = residuals
  zero = jnp.zeros((), g.dtype)
  terms = {(i, j): jnp.where(arg == i * kernel + j, g, zero)
           for i in range(kernel) for j in range(kernel)}
  return (_add_taps(terms, stride, pads, in_hw),)


_max_pool_shifted.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_torch(x: jax.Array, kernel: int, stride: int, padding: int = 0,
                   ceil_mode: bool = False, impl: str = "auto") -> jax.Array:
  """torch.nn.MaxPool2d on NHWC input (padding with -inf, optional ceil mode).

  `impl` as Conv2D's `conv_impl`: 'auto' / 'shifted' take the max of k*k shifted
  slices with a hand-written gradient (`_max_pool_bwd`, PyTorch's first-maximum rule)
  on CPU; 'lax' (and 'auto' off CPU) is flax's reduce_window max pool.
  """
  pads = []
  out_hw = []
  for size in x.shape[1:3]:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start entirely in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
      out -= 1
    hi = (out - 1) * stride + kernel - size - padding
    pads.append((padding, max(hi, 0)))
    out_hw.append(out)
  if use_shifted_kernels(impl) and jnp.issubdtype(x.dtype, jnp.floating):
    return _max_pool_shifted(x, kernel, stride, tuple(pads), tuple(out_hw),
                             tuple(x.shape[1:3]))
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
