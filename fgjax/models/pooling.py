"""Global poolings: backbone outputs -> one feature vector (N, C) per image.

Hanselmann & Ney, "ELoPE: Fine-Grained Visual Classification with Efficient
Localization, Pooling and Embedding" (WACV 2020), section 3:

* `global_avg_pool` (GAP) and `global_max_pool` (GMP), the usual baselines.
* `kmax_pool`: global k-max pooling (GKMP), eq. (2)-(3): per channel, the mean of the
  K largest activations over the I x J positions. K = 1 is GMP, K = I*J is GAP; the
  paper uses K = 4 throughout (Fig. 7 on 14 x 14 maps).
* `weighted_kmax_pool`: GKMP with weighted averaging, section 3.1, eq. (4).

Networks read a backbone's outputs dict {'stem', 'stage1'.., 'map' (N, H, W, C),
'pooled' (N, C)}. Each registered module names in `reads` the entry it consumes, so
callers feed `module(outputs[module.reads])`; 'avg' reads 'pooled' so head-only training
can cache (N, C) features instead of maps. Adding a pooling is one `@register`ed class:

  pool = pooling.make('kmax', k=4)
  feats = pool.apply(variables, outputs[pool.reads])   # (N, C)

Everything computes in the input's dtype; parameters are float32 as elsewhere in fgjax.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax import losses
from fgjax import registries

# The paper's setting for every experiment (section 3, Fig. 7).
DEFAULT_K = 4


def _check_map(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"expected a (N, H, W, C) feature map, got shape {tuple(x.shape)}.")


def _check_k(k, positions: int | None = None) -> int:
  # K fixes a shape, so it must be a concrete integer (int or NumPy integer), not a
  # tracer; bools are ints to Python but never a meaningful K.
  if isinstance(k, bool) or not hasattr(k, "__index__"):
    raise ValueError(f"K must be an integer, got {k!r}.")
  k = operator.index(k)
  if k < 1 or (positions is not None and k > positions):
    bound = "" if positions is None else f" <= H*W = {positions}"
    raise ValueError(f"K = {k}: global k-max pooling needs 1 <= K{bound}.")
  return k


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Global average pooling (GAP; ELoPE section 3): (N, H, W, C) -> (N, C)."""
  _check_map(x)
  return jnp.mean(x, axis=(1, 2))


def exit_features(x: jax.Array) -> jax.Array:
  """The exit branch of sequential early exit (Savchenko 2021): GAP, then
  l2-normalisation: (N, H, W, C) -> (N, C); a pooled (N, C) input is only normalised."""
  x = x if x.ndim == 2 else global_avg_pool(x)
  return losses.l2_normalize(x)


def global_max_pool(x: jax.Array) -> jax.Array:
  """Global max pooling (GMP; ELoPE section 3): (N, H, W, C) -> (N, C).

  The gradient goes to the maximal cell(s) as `jnp.max` defines it (split equally
  between ties); `kmax_pool(x, 1)` is the variant that picks exactly one cell.
  """
  _check_map(x)
  return jnp.max(x, axis=(1, 2))


def _top_k(x: jax.Array, k: int) -> jax.Array:
  """(N, H, W, C) -> (N, K, C): per channel the K largest values, descending (eq. 2)."""
  _check_map(x)
  n, h, w, c = x.shape
  k = _check_k(k, h * w)
  # Positions are flattened row-major (i * W + j); top_k keeps the lower flat index
  # first among equal values, and its gradient is a scatter onto the returned indices.
  return jax.lax.top_k(x.reshape(n, h * w, c), k, axis=1)[0]


def kmax_pool(x: jax.Array, k: int) -> jax.Array:
  """Global k-max pooling, ELoPE eq. (2)-(3): GKMP(y)_d = 1/K sum_k S_{d,k}.

  S_d is channel d's I*J activations sorted in descending order (eq. 2); the output is
  the mean of its first K entries (eq. 3). K = 1 gives GMP, K = H*W gives GAP.

  Gradient: d out_d / d y_{d,i,j} = 1/K on the K selected cells and 0 elsewhere, so the
  error flows back through the K most important parts (section 3). Ties: the selection
  is that of `jax.lax.top_k` on the row-major flattened H*W positions, lower index
  first, so exactly K cells are selected (and receive 1/K each) even when more than K
  cells share the K-th value; e.g. on a constant map the first K positions in row-major
  order get the gradient.

  Args:
    x: (N, H, W, C) float feature map y.
    k: number K of maximal activations, 1 <= K <= H*W (a Python int: it fixes a shape).

  Returns:
    (N, C) in x's dtype.
  """
  return jnp.mean(_top_k(x, k), axis=1)


def weighted_kmax_pool(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Global k-max pooling with weighted averaging, ELoPE eq. (4).

    GKMP(y)_d = 1/K sum_{k=1..K} w_k S_{d,k},   S_{d,1} >= ... >= S_{d,K} (eq. 2)

  exactly as the paper writes it, the 1/K factor included: w_k scales the k-th largest
  activation, and w = 1 (all ones) is plain k-max pooling (eq. 3). The K weights are
  shared by all D channels ("only K parameters", section 3.1); the paper puts no
  constraint on them (no normalisation, sign or ordering), so none is imposed here.

  Gradients: d out_d / d w_k = S_{d,k} / K; d out_d / d y = w_k / K on the cell holding
  S_{d,k} (cells selected as in `kmax_pool`, ties to the lower row-major index) and 0
  on the other H*W - K cells.

  Args:
    x: (N, H, W, C) float feature map y.
    weights: (K,) w, 1 <= K <= H*W; cast to x's dtype.

  Returns:
    (N, C) in x's dtype.
  """
  weights = jnp.asarray(weights)
  if weights.ndim != 1:
    raise ValueError(f"weights must be (K,), got shape {tuple(weights.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float feature map, got {x.dtype}.")
  k = weights.shape[0]
  # A Python-int divisor is weakly typed, so the result stays in x's dtype.
  return jnp.einsum("nkc,k->nc", _top_k(x, k), weights.astype(x.dtype)) / k


# --- registry -------------------------------------------------------------------------

POOLINGS = registries.Registry("pooling", "config.model.pooling")
names = POOLINGS.names


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator: registers a pooling module under `name`.

  The class must be a flax.linen Module with a class attribute `reads` (the backbone
  output it consumes) and `__call__(self, x) -> (N, C)`.
  """

  def wrap(cls: type[nn.Module]) -> type[nn.Module]:
    if not isinstance(getattr(cls, "reads", None), str):
      raise TypeError(f"pooling {name!r}: {cls.__name__} needs a class attribute "
                      "`reads` naming the backbone output it consumes.")
    return POOLINGS.register(name)(cls)

  return wrap


def _cls(name: str) -> type[nn.Module]:
  return POOLINGS.get(name)


def reads(name: str) -> str:
  """The backbone output ('map', 'pooled', ...) that pooling `name` consumes."""
  return _cls(name).reads


def options(name: str) -> tuple[str, ...]:
  """The options pooling `name` takes (its module attributes, e.g. ('k',))."""
  return tuple(sorted(f.name for f in dataclasses.fields(_cls(name))
                      if f.init and f.name not in ("parent", "name")))


def make(name: str, **options) -> nn.Module:
  """Builds pooling `name`; `options` are its attributes (e.g. k for 'kmax').

  Raises:
    ValueError: unknown name, or an option the pooling does not take.
  """
  cls = _cls(name)
  # 'name' is flax's own submodule-name attribute; 'parent' is flax plumbing.
  taken = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "parent"}
  unknown = sorted(set(options) - taken)
  if unknown:
    offered = ", ".join(sorted(taken - {"name"})) or "none"
    raise ValueError(f"pooling {name!r} does not take option(s) "
                     f"{', '.join(map(repr, unknown))}; "
                     f"its options: {offered}.")
  return cls(**options)


@register("avg")
class AvgPool(nn.Module):
  """GAP. Reads the backbone's 'pooled' (its global average of 'map'), unchanged."""
  reads = "pooled"

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f"'avg' reads 'pooled' features (N, C), got {tuple(x.shape)}.")
    return x


@register("max")
class MaxPool(nn.Module):
  """GMP over 'map': (N, H, W, C) -> (N, C)."""
  reads = "map"

  def __call__(self, x: jax.Array) -> jax.Array:
    return global_max_pool(x)


@register("kmax")
class KMaxPool(nn.Module):
  """GKMP over 'map', ELoPE eq. (3): (N, H, W, C) -> (N, C).

  Attributes:
    k: number K of maximal activations averaged per channel (paper: 4).
  """
  k: int = DEFAULT_K
  reads = "map"

  def __post_init__(self):
    _check_k(self.k)  # fail at construction; H*W is only checked when called
    super().__post_init__()

  def __call__(self, x: jax.Array) -> jax.Array:
    return kmax_pool(x, self.k)


@register("weighted_kmax")
class WeightedKMaxPool(nn.Module):
  """GKMP with weighted averaging over 'map', ELoPE eq. (4): (N, H, W, C) -> (N, C).

  The param 'weights' (K,) starts at ones: the paper gives no initialisation, and with
  eq. (4)'s 1/K factor ones make the module equal `KMaxPool(k)` at init, so it can
  fine-tune a trained k-max model ("weighted average finetuning", Table 5).

  Attributes:
    k: number K of maximal activations per channel (paper: 4).
  """
  k: int = DEFAULT_K
  reads = "map"

  def __post_init__(self):
    _check_k(self.k)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weights = self.param("weights", nn.initializers.ones, (self.k,), jnp.float32)
    return weighted_kmax_pool(x, weights)
