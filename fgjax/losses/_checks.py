"""Argument validation shared by `fgjax.losses` and `fgjax.impostors`.

Every check runs in Python at trace time, before any jitted computation: shape
and dtype checks always (shapes are static under `jit`), value checks (label
ranges, sigma > 0) only when the value is concrete, i.e. not a JAX tracer, so
the helpers are free under `jit`/`vmap`/`grad` and still catch bad eager input.
"""
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` holds values Python can read (not a tracer)."""
  return not isinstance(x, jax.core.Tracer)


def check_float_array(x: Any, name: str, ndim: int) -> Any:
  """Raises unless `x` is a floating array of rank `ndim`; returns it, not copied.

  fgjax's one float-array validator (losses, impostors, search, quantize). Lists and
  tuples become NumPy arrays; NumPy input stays NumPy (a ScaNN index takes it as is).
  Integer input is rejected rather than silently cast: an integer embedding is
  almost always a swapped argument (labels passed as features).
  """
  if isinstance(x, (list, tuple)):
    x = np.asarray(x)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"`{name}` must be an array; got {type(x).__name__}.")
  if x.ndim != ndim:
    hint = " Reshape a single vector with x[None, :]." if ndim == 2 and x.ndim == 1 else ""
    raise ValueError(f"`{name}` must be {ndim}-D; got shape {tuple(x.shape)}.{hint}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`{name}` must have a floating dtype; got {x.dtype}. "
                    "Cast it with .astype(np.float32).")
  return x


def float_array(x: Any, name: str, ndim: int) -> jax.Array:
  """`check_float_array`, returned as a JAX array."""
  return jnp.asarray(check_float_array(x, name, ndim))


def int_array(x: Any, name: str, ndim: Union[int, tuple]) -> jax.Array:
  """Returns `x` as an int32 JAX array of rank `ndim` (or exact shape), or raises."""
  if isinstance(x, (list, tuple)):
    x = np.asarray(x)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"`{name}` must be an integer array; got {type(x).__name__}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"`{name}` must be an integer array; got dtype {x.dtype}.")
  if isinstance(ndim, tuple):
    if tuple(x.shape) != ndim:
      raise ValueError(f"`{name}` must have shape {ndim}; got {tuple(x.shape)}.")
  elif x.ndim != ndim:
    raise ValueError(f"`{name}` must have rank {ndim}; got shape {tuple(x.shape)}.")
  return jnp.asarray(x, jnp.int32)


def same_size(a: jax.Array, a_name: str, axis_a: int, b: jax.Array, b_name: str,
              axis_b: int) -> None:
  """Raises unless a.shape[axis_a] == b.shape[axis_b]."""
  if a.shape[axis_a] != b.shape[axis_b]:
    raise ValueError(
        f"`{a_name}` has shape {tuple(a.shape)} and `{b_name}` has shape "
        f"{tuple(b.shape)}: axis {axis_a} of `{a_name}` must equal axis "
        f"{axis_b} of `{b_name}`.")


def same_dim(a: jax.Array, a_name: str, b: jax.Array, b_name: str) -> None:
  """Raises unless the last (feature) axes of `a` and `b` agree."""
  same_size(a, a_name, a.ndim - 1, b, b_name, b.ndim - 1)


def labels_in_range(labels: jax.Array, name: str, num_classes: int) -> None:
  """When concrete, raises unless every label is in [0, num_classes)."""
  in_range(labels, name, 0, num_classes, f"class ids, num_classes={num_classes}")


def in_range(x: jax.Array, name: str, low: int, high: int, what: str) -> None:
  """When `x` is concrete, raises unless every value is in [low, high)."""
  if not is_concrete(x) or x.size == 0:
    return
  v = np.asarray(x)
  lo, hi = int(v.min()), int(v.max())
  if lo < low or hi >= high:
    raise ValueError(f"`{name}` values must lie in [{low}, {high}) ({what}); "
                     f"got min {lo}, max {hi}.")


def _scalar(x: Any, name: str, strict: bool) -> None:
  if hasattr(x, "shape") and tuple(x.shape) != ():
    raise ValueError(f"`{name}` must be a scalar; got shape {tuple(x.shape)}.")
  if not is_concrete(x):
    return
  v = float(np.asarray(x))
  if not (np.isfinite(v) and (v > 0 if strict else v >= 0)):
    raise ValueError(f"`{name}` must be a finite number {'>' if strict else '>='} 0; "
                     f"got {v}.")


def positive_scalar(x: Any, name: str) -> None:
  """Raises unless `x` is a scalar and, when concrete, finite and > 0."""
  _scalar(x, name, strict=True)


def nonnegative_number(x: Any, name: str) -> None:
  """Raises unless `x` is a scalar and, when concrete, finite and >= 0."""
  _scalar(x, name, strict=False)


def num_classes_arg(num_classes: Any) -> int:
  """Returns `num_classes` as a Python int >= 1 (it fixes an output shape)."""
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(
      num_classes, (int, np.integer)):
    raise TypeError("`num_classes` must be a Python int (it fixes the output "
                    f"shape; mark it static under jit); got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"`num_classes` must be >= 1; got {num_classes}.")
  return int(num_classes)


def chunk_size_arg(chunk_size: Optional[int], total: int) -> Optional[int]:
  """Validates `chunk_size`; returns None when chunking is a no-op."""
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
    raise TypeError(f"`chunk_size` must be a Python int or None; got {chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"`chunk_size` must be >= 1; got {chunk_size}.")
  return None if chunk_size >= total else int(chunk_size)


def compute_dtype(*dtypes) -> jnp.dtype:
  """Float dtype the kernel math runs in: at least float32 (bf16 logits overflow)."""
  return jnp.result_type(jnp.float32, *dtypes)
