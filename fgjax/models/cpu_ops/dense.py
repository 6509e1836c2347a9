"""Dense convolutions whose gradients avoid XLA:CPU's slow spots: a stem's conv + max
pool (`conv_max_pool`) and a stride-1 'SAME' convolution for loop bodies (`conv_same`)."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from fgjax.models.cpu_ops.pooling import (max_pool_vjp, max_pool_with_argmax,
                                          pool_geometry, pool_grad_terms)
from fgjax.models.cpu_ops.taps import interleave, tap_phases


def _conv_out_hw(in_hw, kernel_hw, stride, pads) -> tuple[int, int]:
  return tuple((size + lo + hi - k) // stride + 1
               for size, (lo, hi), k in zip(in_hw, pads, kernel_hw))


def _conv(x, kernel, stride, pads):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _same_pads(kernel_hw) -> tuple[tuple[int, int], tuple[int, int]]:
  """lax's 'SAME' padding at stride 1: the extra row of an even kernel goes at the end."""
  return tuple(((k - 1) // 2, k // 2) for k in kernel_hw)


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 dense convolution with 'SAME' padding, whose gradients stay fast in loops.

  Args:
    x: (N, H, W, Cin); kernel: (kh, kw, Cin, Cout) HWIO.
  Returns:
    (N, H, W, Cout), equal to lax.conv_general_dilated(x, kernel, (1, 1), 'SAME').

  Why: inside a lax.scan / while loop body, XLA:CPU runs the lax convolution's
  gradients about 20x slower than the same ops jitted alone (the input gradient of a
  3x3 convolution, 64 x 112 x 112 x 8 -> 32: 0.048 s alone, 1.0 s per loop iteration;
  the kernel gradient 0.35 s and 7.8 s), while the forward convolution and GEMMs keep
  their speed. The custom VJP takes the input gradient as a forward-form convolution
  of dy with the flipped kernel and the kernel gradient as one GEMM per tap
  (BENCHMARKS 17, Coarse2Fine's up-sampler pre-training loop).
  """
  return _conv(x, kernel, 1, _same_pads(kernel.shape[:2]))


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = _same_pads((kh, kw))
  g = g.astype(x.dtype)
  # The transpose of a stride-1 correlation is a correlation with the flipped kernel,
  # its channels swapped, and the padding mirrored.
  dx = _conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1, ((pb, pt), (pr, pl)))
  # One (Cin, Cout) GEMM per tap over the shifted input, without an im2col copy (its
  # patch matrix would be kh*kw times the size of the input).
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  h, w = x.shape[1:3]
  dk = jnp.stack([jnp.einsum("nhwc,nhwf->cf", xp[:, i:i + h, j:j + w], g,
                             preferred_element_type=jnp.float32)
                  for i in range(kh) for j in range(kw)])
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_max_pool(x, kernel, conv_stride, conv_pads, pool_kernel, pool_stride,
                   pool_pads, pool_out_hw):
  y = _conv(x, kernel, conv_stride, conv_pads)
  return max_pool_vjp(y, pool_kernel, pool_stride, pool_pads, pool_out_hw,
                           tuple(y.shape[1:3]))


def _conv_max_pool_fwd(x, kernel, conv_stride, conv_pads, pool_kernel, pool_stride,
                       pool_pads, pool_out_hw):
  y = _conv(x, kernel, conv_stride, conv_pads)
  out, arg = max_pool_with_argmax(y, pool_kernel, pool_stride, pool_pads, pool_out_hw,
                                  None)
  return out, (x, kernel, arg)


def _conv_max_pool_bwd(conv_stride, conv_pads, pool_kernel, pool_stride, pool_pads,
                       pool_out_hw, residuals, g):
  """Kernel gradient per polyphase component of the pool, as GEMMs over im2col patches.

  With y = conv(x) and p = maxpool(y), dL/dy is non-zero only at window maxima. Its
  polyphase component (a, b) (rows s_p * u + a of y) is a dense sum of the taps' masked
  gradients (`tap_phases`), and
    dK[r, c, :, :] = sum_ab sum_{n,u,v} x[n, S u + s_c a + r, S v + s_c b + c, :]^T
                                        * dy_ab[n, u, v, :],    S = s_c * s_p,
  i.e. one (N*hq*wq, kh*kw*Cin)^T x (N*hq*wq, Cout) GEMM per component. XLA's own
  kernel gradient needs the full-resolution dL/dy interleaved and transposed in
  memory, which for SqueezeNet's stem (111 x 111 x 64 at batch 32) cost more than the
  whole rest of the stem. The input gradient (a network input usually needs none, and
  then XLA drops it) goes through the interleaved dL/dy and the lax conv's transpose.
  """
  del pool_out_hw  # g has that shape
  x, kernel, arg = residuals
  s_c, s_p = conv_stride, pool_stride
  stride = s_c * s_p
  kh, kw, cin, cout = kernel.shape
  conv_hw = _conv_out_hw(x.shape[1:3], (kh, kw), s_c, conv_pads)
  phases, (hq, wq) = tap_phases(pool_grad_terms(arg, g, pool_kernel), s_p,
                                pool_pads, conv_hw)
  (ct, _), (cl, _) = conv_pads
  (pt, _), (pl, _) = pool_pads
  n, h, w, _ = x.shape
  # Phase (a, b) element (u, v), conv tap (r, c) reads input row
  # stride*u + s_c*(a - pt) + r - ct; pad x so that every such row exists (the extra
  # rows meet zero gradient: pool padding and rows past the conv output).
  top, left = s_c * pt + ct, s_c * pl + cl
  bottom = max(0, stride * (hq - 1) + s_c * (s_p - 1) + kh - top - h)
  right = max(0, stride * (wq - 1) + s_c * (s_p - 1) + kw - left - w)
  # Channels-first copy of the (small) input, so each patch matrix is built as
  # (kh*kw*Cin, N*hq*wq) and dK is a plain GEMM contracting its long minor axis.
  xt = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).transpose(3, 0, 1, 2)
  dk = None
  for (a, b), dy in phases.items():
    rows = [jax.lax.slice(xt, (0, 0, s_c * a + r, s_c * b + c),
                          (cin, n, s_c * a + r + stride * (hq - 1) + 1,
                           s_c * b + c + stride * (wq - 1) + 1),
                          (1, 1, stride, stride))
            for r in range(kh) for c in range(kw)]
    patches = jnp.concatenate(rows, axis=0).reshape(kh * kw * cin, n * hq * wq)
    term = jnp.dot(patches, dy.reshape(n * hq * wq, cout).astype(x.dtype),
                   preferred_element_type=jnp.float32)
    dk = term if dk is None else dk + term
  dk = dk.reshape(kernel.shape).astype(kernel.dtype)
  dy = interleave(phases, s_p, pool_pads, conv_hw).astype(x.dtype)
  _, conv_vjp = jax.vjp(lambda x: _conv(x, kernel, s_c, conv_pads), x)
  (dx,) = conv_vjp(dy)
  return dx, dk


_conv_max_pool.defvjp(_conv_max_pool_fwd, _conv_max_pool_bwd)


def conv_max_pool(x: jax.Array, kernel: jax.Array, conv_stride: int,
                  conv_pads: Sequence[tuple[int, int]], pool_kernel: int,
                  pool_stride: int, pool_padding: int = 0,
                  ceil_mode: bool = False) -> jax.Array:
  """max_pool(conv(x, kernel)): a dense convolution, then torch.nn.MaxPool2d.

  Args:
    x: (N, H, W, Cin) input.
    kernel: (kh, kw, Cin, Cout) HWIO weights.
    conv_stride: convolution stride.
    conv_pads: ((top, bottom), (left, right)) zero padding of the convolution.
    pool_kernel, pool_stride, pool_padding, ceil_mode: as torch.nn.MaxPool2d.

  Returns:
    (N, Hp, Wp, Cout), equal to max_pool_shifted(lax conv(x, kernel), ...), with the
    same gradients (first-maximum rule) through a fused custom VJP (`_conv_max_pool_bwd`).
    A per-channel bias and a monotone activation commute with the max, so
    relu(conv_max_pool(x, k) + b) is maxpool(relu(conv(x, k) + b)) at a quarter of the
    elementwise work; SqueezeNet's stem is computed that way.
  """
  conv_pads = tuple((int(lo), int(hi)) for lo, hi in conv_pads)
  conv_hw = _conv_out_hw(x.shape[1:3], kernel.shape[:2], conv_stride, conv_pads)
  pool_pads, out_hw = pool_geometry(conv_hw, pool_kernel, pool_stride, pool_padding,
                                    ceil_mode)
  return _conv_max_pool(x, kernel, int(conv_stride), conv_pads, int(pool_kernel),
                        int(pool_stride), pool_pads, out_hw)
