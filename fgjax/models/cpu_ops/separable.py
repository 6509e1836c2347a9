"""Depthwise and pointwise (1x1) convolutions, the two halves of a separable block.

`depthwise_conv_shifted` is k*k shifted multiply-adds, with a polyphase kernel gradient
accumulated over cache-sized batch chunks and, for kernels above 3x3, an input gradient
taken as a correlation of the once-padded output gradient. `pointwise_conv` is an
unpadded 1x1 convolution as one matmul.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from fgjax.models.cpu_ops.taps import add_taps, interleave, shifted_slices


def _depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int,
                       pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return _depthwise_padded(jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), kernel, stride)


def _depthwise_padded(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  kh, kw = kernel.shape[:2]
  out_hw = ((x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1)
  out = None
  for (i, j), tap in shifted_slices(x, kh, kw, stride, out_hw):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, stride, pads):
  return _depthwise_forward(x, kernel, stride, pads)


def _depthwise_fwd(x, kernel, stride, pads):
  # The padded input is the residual: XLA:CPU writes it once for the forward's slices,
  # and the kernel gradient's chunks are then plain slices of it.
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  return _depthwise_padded(xp, kernel, stride), (xp, kernel)


# Batch chunks for the depthwise kernel gradient (see `_kernel_grad`): the bytes of
# (xp, g) per chunk, and the largest image for which chunking paid off on the VM.
_KERNEL_GRAD_CHUNK_BYTES = 12 << 20
_KERNEL_GRAD_CHUNK_MAX_IMAGE_BYTES = 2 << 20


def _kernel_grad_taps(xp, g, kh, kw, stride):
  """(kh*kw, C): dk_ij = sum_{n,y,x} phase(xp)[n, y, x] * (g placed at (i//s, j//s)).

  xp is the padded input; phase (a, b) = xp[:, a::s, b::s] (padded at the end to hq x
  wq rows/columns when needed), so a strided conv multiplies dense arrays.
  """
  s = stride
  ho, wo = g.shape[1:3]
  hq, wq = -(-xp.shape[1] // s), -(-xp.shape[2] // s)
  zero = jnp.zeros((), g.dtype)
  if (hq * s, wq * s) != xp.shape[1:3]:
    xp = jax.lax.pad(xp, zero, ((0, 0, 0), (0, hq * s - xp.shape[1], 0),
                                (0, wq * s - xp.shape[2], 0), (0, 0, 0)))
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
  return jnp.stack([dk[i, j] for i in range(kh) for j in range(kw)])


def _kernel_grad(xp, g, kh, kw, stride):
  """The depthwise kernel gradient, (kh*kw, C), accumulated over cache-sized batch chunks.

  Each tap is a separate reduction over the whole (xp, g) pair, so for a full batch
  every one of the k*k taps streams both arrays from memory; a loop over chunks of
  the batch keeps a chunk in the 32 MiB L3 cache across its taps. Measured per
  EfficientNet-Lite0 block (batch 32, forward + backward): 10-20% faster at 28x28 and
  below, 5-30% slower at 56x56 and 112x112 (image above 2 MiB), which stay unchunked.
  """
  n = xp.shape[0]
  per_image = (xp[0].size + g[0].size) * xp.dtype.itemsize
  b = max([d for d in range(1, n + 1)
           if n % d == 0 and d * per_image <= _KERNEL_GRAD_CHUNK_BYTES] or [1])
  if b == n or per_image > _KERNEL_GRAD_CHUNK_MAX_IMAGE_BYTES:
    return _kernel_grad_taps(xp, g, kh, kw, stride)

  # Chunk k holds images k, k + n/b, ...: the batch axis that a data-parallel mesh
  # shards stays whole-sharded in axis 0 and the loop slices axis 1.
  xr = xp.reshape(b, n // b, *xp.shape[1:])
  gr = g.reshape(b, n // b, *g.shape[1:])

  def chunk(k, acc):
    xc = jax.lax.dynamic_index_in_dim(xr, k, axis=1, keepdims=False)
    gc = jax.lax.dynamic_index_in_dim(gr, k, axis=1, keepdims=False)
    return acc + _kernel_grad_taps(xc, gc, kh, kw, stride)

  return jax.lax.fori_loop(0, n // b, chunk,
                           jnp.zeros((kh * kw, xp.shape[-1]), xp.dtype))


def _input_grad(g, kernel, stride, pads, in_hw):
  """dx of the depthwise conv: sum_ij (g placed at offset (i, j), dilated) * k_ij.

  3x3: the sum of padded terms (`add_taps`), which XLA fuses into one loop. Larger
  kernels: as a correlation of g, padded once, with the flipped kernel (per polyphase
  component for stride > 1): XLA:CPU's fused loop over 25 padded terms bounds-checks
  every term and ran 2-4x slower than 25 plain slices (BENCHMARKS.md section 3).
  """
  kh, kw = kernel.shape[:2]
  if kh * kw <= 9:
    return add_taps({(i, j): g * kernel[i, j, 0] for i in range(kh) for j in range(kw)},
                    stride, pads, in_hw)
  (pt, _), (pl, _) = pads
  h, w = in_hw
  n, ho, wo, c = g.shape
  s = stride
  # Phase (a, b) holds padded input positions (s*u + a, s*v + b); tap i = a + s*t
  # reads g row u - t. Stride 1 computes the unpadded rows directly (offset pt, pl).
  if s == 1:
    hq, wq, oh, ow = h, w, pt, pl
  else:
    hq, wq, oh, ow = -(-(h + pt) // s), -(-(w + pl) // s), 0, 0
  th, tw = -(-kh // s), -(-kw // s)
  gp = jnp.pad(g, ((0, 0), (th - 1, max(hq + oh - ho, 0)), (tw - 1, max(wq + ow - wo, 0)),
                   (0, 0)))
  # Materialised once: fused into the sum, the pad would be re-evaluated per tap.
  gp = jax.lax.optimization_barrier(gp)
  phases = {}
  for a in range(min(s, kh)):
    for b in range(min(s, kw)):
      acc = None
      for i in range(a, kh, s):
        for j in range(b, kw, s):
          r0, c0 = oh + th - 1 - i // s, ow + tw - 1 - j // s
          term = jax.lax.slice(gp, (0, r0, c0, 0), (n, r0 + hq, c0 + wq, c)) * kernel[i, j, 0]
          acc = term if acc is None else acc + term
      phases[a, b] = acc
  return phases[0, 0] if s == 1 else interleave(phases, s, pads, in_hw)


def _depthwise_bwd(stride, pads, residuals, g):
  """Input and kernel gradients of the shifted depthwise conv, without shifted copies.

  Why hand-written: autodiff of the k*k slices saves each shifted slice as a residual,
  and XLA:CPU writes all k*k of them to memory (25 copies of the activations for a 5x5
  layer). Here no expression is shared between the forward and the two gradients, so
  every term fuses into its consumer (`_input_grad`, `_kernel_grad`). The kernel
  gradient of a strided conv multiplies polyphase components of x_pad with g, dense
  arrays (no zero-interleaved g).
  """
  xp, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = pads
  in_hw = (xp.shape[1] - pt - pb, xp.shape[2] - pl - pr)
  dx = _input_grad(g, kernel, stride, pads, in_hw)
  dk = _kernel_grad(xp, g, kh, kw, stride)
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
