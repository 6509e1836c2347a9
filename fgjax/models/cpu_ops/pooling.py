"""torch.nn.MaxPool2d as a max of shifted slices, with PyTorch's first-max gradient."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from fgjax.models.cpu_ops.taps import Pads, add_taps, shifted_slices


def _max_pool_taps(x, kernel, stride, pads, out_hw):
  lowest = jnp.array(-jnp.inf, x.dtype)
  xp = jax.lax.pad(x, lowest, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  for _, tap in shifted_slices(xp, kernel, kernel, stride, out_hw):
    yield tap


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def max_pool_vjp(x, kernel, stride, pads, out_hw, in_hw):
  out = None
  for tap in _max_pool_taps(x, kernel, stride, pads, out_hw):
    out = tap if out is None else jnp.maximum(out, tap)
  return out


def max_pool_with_argmax(x, kernel, stride, pads, out_hw, in_hw):
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


def pool_grad_terms(arg: jax.Array, g: jax.Array, kernel: int) -> dict:
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
  component (`add_taps`).
  """
  del out_hw  # g has that shape
  return (add_taps(pool_grad_terms(residuals, g, kernel), stride, pads, in_hw),)


max_pool_vjp.defvjp(max_pool_with_argmax, _max_pool_bwd)


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
  return max_pool_vjp(x, kernel, stride, pads, out_hw, tuple(x.shape[1:3]))
