"""CPU-friendly formulations of convolution and pooling, with hand-written gradients.

XLA:CPU runs some convolution-network ops far slower than the arithmetic needs (measured
on a 2-core AMD EPYC, BENCHMARKS.md section 3): grouped (depthwise) convolutions, 1x1
convolutions and their gradients, select-and-scatter (the max-pool gradient), and the
zero-interleaved or transposed copies of large activations that strided gradients
make. Each function here computes the same values as the lax op it replaces, with a
custom VJP that keeps every gradient a dense elementwise pass or a GEMM:

* `depthwise_conv_shifted`: k*k shifted multiply-adds; a polyphase kernel gradient
  accumulated over cache-sized batch chunks, and for kernels above 3x3 an input
  gradient taken as a correlation of the once-padded output gradient.
* `pointwise_conv`: an unpadded 1x1 convolution as one matmul.
* `max_pool_shifted`: max of shifted slices, gradient by PyTorch's first-maximum rule.
* `conv_max_pool`: a dense convolution followed by a max pool (a stem), whose kernel
  gradient is taken per polyphase component of the pool, as GEMMs over im2col patches,
  without materialising the convolution's full-resolution gradient.
* `conv_same`: a stride-1 dense convolution whose gradients keep their speed inside a
  lax.scan (XLA:CPU's own slow down about 20x there).

`fgjax.models.layers` decides when to use the first four (CPU, `conv_impl`);
Coarse2Fine's up-sampler, which pre-trains in a lax.scan, calls `conv_same` itself.
They are plain JAX and run, and differentiate, on any backend.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], tuple[int, int]]

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
  return _depthwise_padded(jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), kernel, stride)


def _depthwise_padded(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  kh, kw = kernel.shape[:2]
  out_hw = ((x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1)
  out = None
  for (i, j), tap in _shifted_slices(x, kh, kw, stride, out_hw):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _tap_phases(terms: dict, stride: int, pads, in_hw):
  """Sums k*k strided tap terms per polyphase component of the padded input.

  terms[i, j] is an (N, Ho, Wo, C) array whose element (y, x) belongs to padded input
  position (i + stride * y, j + stride * x). Returns ({(a, b): (N, hq, wq, C)}, (hq, wq))
  where phase (a, b) element (u, v) is the sum at padded position
  (stride * u + a, stride * v + b); phases without taps are absent.
  """
  (pt, _), (pl, _) = pads
  h, w = in_hw
  s = stride
  _, ho, wo, _ = next(iter(terms.values())).shape
  kh = 1 + max(i for i, _ in terms)
  kw = 1 + max(j for _, j in terms)
  hq = max((kh - 1) // s + ho, -(-(pt + h) // s))
  wq = max((kw - 1) // s + wo, -(-(pl + w) // s))
  phases = {}
  for (i, j), t in terms.items():
    u, v = i // s, j // s
    t = jax.lax.pad(t, jnp.zeros((), t.dtype),
                    ((0, 0, 0), (u, hq - u - ho, 0), (v, wq - v - wo, 0), (0, 0, 0)))
    key = (i % s, j % s)
    phases[key] = t if key not in phases else phases[key] + t
  return phases, (hq, wq)


def _interleave(phases: dict, stride: int, pads, in_hw) -> jax.Array:
  """Inverse of splitting into polyphase components, cropped to the unpadded input."""
  (pt, _), (pl, _) = pads
  h, w = in_hw
  s = stride
  some = next(iter(phases.values()))
  n, hq, wq, c = some.shape
  empty = jnp.zeros((n, hq, wq, c), some.dtype)
  rows = [jnp.stack([phases.get((a, b), empty) for b in range(s)], axis=3)
          for a in range(s)]
  full = jnp.stack(rows, axis=2).reshape(n, hq * s, wq * s, c)
  return full[:, pt:pt + h, pl:pl + w, :]


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
  if stride == 1:
    some = next(iter(terms.values()))
    ho, wo = some.shape[1:3]
    zero = jnp.zeros((), some.dtype)
    out = None
    for (i, j), t in terms.items():
      t = jax.lax.pad(t, zero, ((0, 0, 0), (i - pt, h - (i - pt) - ho, 0),
                                (j - pl, w - (j - pl) - wo, 0), (0, 0, 0)))
      out = t if out is None else out + t
    return out
  phases, _ = _tap_phases(terms, stride, pads, in_hw)
  return _interleave(phases, stride, pads, in_hw)


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

  3x3: the sum of padded terms (`_add_taps`), which XLA fuses into one loop. Larger
  kernels: as a correlation of g, padded once, with the flipped kernel (per polyphase
  component for stride > 1): XLA:CPU's fused loop over 25 padded terms bounds-checks
  every term and ran 2-4x slower than 25 plain slices (BENCHMARKS.md section 3).
  """
  kh, kw = kernel.shape[:2]
  if kh * kw <= 9:
    return _add_taps({(i, j): g * kernel[i, j, 0] for i in range(kh) for j in range(kw)},
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
  return phases[0, 0] if s == 1 else _interleave(phases, s, pads, in_hw)


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


def _pool_grad_terms(arg: jax.Array, g: jax.Array, kernel: int) -> dict:
  """Per window tap (i, j): g where that tap was the (first) maximum, else 0."""
  zero = jnp.zeros((), g.dtype)
  return {(i, j): jnp.where(arg == i * kernel + j, g, zero)
          for i in range(kernel) for j in range(kernel)}


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
  return (_add_taps(_pool_grad_terms(residuals, g, kernel), stride, pads, in_hw),)


_max_pool_shifted.defvjp(_max_pool_fwd, _max_pool_bwd)


def pool_geometry(in_hw: Sequence[int], kernel: int, stride: int, padding: int = 0,
                  ceil_mode: bool = False) -> tuple[Pads, tuple[int, int]]:
  """torch.nn.MaxPool2d's output size and the (lo, hi) -inf padding that realises it.

  Returns (((top, bottom), (left, right)), (out_h, out_w)); `hi` can be below the
  PyTorch padding when floor mode drops trailing pixels (then it is clipped at 0 and the
  slices stop early).
  """
  pads, out_hw = [], []
  for size in in_hw:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start entirely in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
      out -= 1
    hi = (out - 1) * stride + kernel - size - padding
    pads.append((padding, max(hi, 0)))
    out_hw.append(out)
  return tuple(pads), tuple(out_hw)


def max_pool_shifted(x: jax.Array, kernel: int, stride: int, padding: int = 0,
                     ceil_mode: bool = False) -> jax.Array:
  """torch.nn.MaxPool2d on NHWC input as a max of k*k shifted slices.

  Differentiable through a custom VJP that routes each output's gradient to the first
  maximal tap of its window (PyTorch's rule; `_max_pool_bwd`).
  """
  pads, out_hw = pool_geometry(x.shape[1:3], kernel, stride, padding, ceil_mode)
  return _max_pool_shifted(x, kernel, stride, pads, out_hw, tuple(x.shape[1:3]))


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
  return _max_pool_shifted(y, pool_kernel, pool_stride, pool_pads, pool_out_hw,
                           tuple(y.shape[1:3]))


def _conv_max_pool_fwd(x, kernel, conv_stride, conv_pads, pool_kernel, pool_stride,
                       pool_pads, pool_out_hw):
  y = _conv(x, kernel, conv_stride, conv_pads)
  out, arg = _max_pool_fwd(y, pool_kernel, pool_stride, pool_pads, pool_out_hw, None)
  return out, (x, kernel, arg)


def _conv_max_pool_bwd(conv_stride, conv_pads, pool_kernel, pool_stride, pool_pads,
                       pool_out_hw, residuals, g):
  """Kernel gradient per polyphase component of the pool, as GEMMs over im2col patches.

  With y = conv(x) and p = maxpool(y), dL/dy is non-zero only at window maxima. Its
  polyphase component (a, b) (rows s_p * u + a of y) is a dense sum of the taps' masked
  gradients (`_tap_phases`), and
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
  phases, (hq, wq) = _tap_phases(_pool_grad_terms(arg, g, pool_kernel), s_p,
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
  dy = _interleave(phases, s_p, pool_pads, conv_hw).astype(x.dtype)
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
