"""Shifted strided slices and their transpose: the taps every op in cpu_ops is built on.

A k x k window op at stride s reads k*k strided slices of the padded input
(`shifted_slices`); its gradient writes k*k terms back. `add_taps` is that transpose,
and for s > 1 it sums each polyphase component (taps with equal i % s, j % s) densely
before interleaving them (`tap_phases`, `interleave`), because XLA:CPU writes every
zero-interleaved pad of every term to memory.
"""

import jax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], tuple[int, int]]


def shifted_slices(xp: jax.Array, kh: int, kw: int, stride: int,
                   out_hw: tuple[int, int]):
  """Yields ((i, j), tap) for the kh*kw window taps of padded xp: the (N, Ho, Wo, C)
  strided slice starting at row i, column j. `add_taps` is its transpose."""
  ho, wo = out_hw
  for i in range(kh):
    for j in range(kw):
      yield (i, j), jax.lax.slice(
          xp, (0, i, j, 0),
          (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
           xp.shape[3]),
          (1, stride, stride, 1))


def tap_phases(terms: dict, stride: int, pads, in_hw):
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


def interleave(phases: dict, stride: int, pads, in_hw) -> jax.Array:
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


def add_taps(terms: dict, stride: int, pads, in_hw) -> jax.Array:
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
  phases, _ = tap_phases(terms, stride, pads, in_hw)
  return interleave(phases, stride, pads, in_hw)
