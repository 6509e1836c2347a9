"""Named backbone outputs, and running a backbone up to a stage or on from one.

Every fgjax backbone is an ordered list of segments, each mapping the previous output to
a named one, as big_vision's models return every intermediate in `out`:

  'stem' -> 'stage1' .. 'stageK' (NHWC maps) -> 'map' (the last conv map, NHWC)
  -> 'pooled' (global average of 'map', (N, C)) [-> 'logits' (ImageNet, include_top)]

`run_segments(segments, x, start=None, stop=None)` returns the dict of the outputs it
computed. `stop='stage3'` runs up to stage3 and nothing after it; `start='stage3'` takes
`x` as the stage3 output and continues from there, so sequential early exit runs a
backbone piece by piece without computing anything twice. Each segment's layers have
fixed names inside the backbone module, so the same variables serve every (start, stop).

`tail_start(...)` finds where a backbone whose last N parameter groups train can be cut:
the output computed from the frozen groups alone. Head-only training caches that output
once per image and runs only the rest (fgjax.models.nets.build's `cached_tail`).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Segment = tuple[str, Callable[[jax.Array], jax.Array]]


def output_names(segments: Sequence[Segment]) -> tuple[str, ...]:
  return tuple(name for name, _ in segments)


def _position(names: Sequence[str], name: str, what: str) -> int:
  if name not in names:
    raise ValueError(f"{what}={name!r} is not an output of this backbone; its outputs "
                     f"are {', '.join(names)}.")
  return list(names).index(name)


def output_groups(backbone: nn.Module, outputs: Sequence[str],
                  image_size: int) -> dict[str, frozenset[str]]:
  """{output: the top-level parameter groups computing it} for each of `outputs`.

  Read off the shapes of `backbone.init(..., stop=output)`: nothing is computed.
  """
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  key = jax.random.key(0)
  return {o: frozenset(jax.eval_shape(
      lambda x, o=o: backbone.init(key, x, stop=o), image)["params"]) for o in outputs}


def tail_start(groups: dict[str, frozenset[str]], blocks: Sequence[str], n: int) -> str:
  """The last output computed from `blocks[:-n]` alone: where `trainable='last:n'` can
  cut the backbone. A ValueError lists the n that cut it between two outputs.

  Args:
    groups: output_groups of the backbone, in forward order.
    blocks: the backbone's top-level parameter groups in forward order.
    n: how many of the last blocks train.
  """
  frozen = frozenset(blocks[:-n] if n < len(blocks) else ())
  starts = [o for o, g in groups.items() if g == frozen]
  if not starts:
    valid = sorted({len(blocks) - len(g) for g in groups.values() if 0 < len(g) < len(blocks)})
    raise ValueError(
        f"config.model.trainable='last:{n}' with config.train.cache_features=True: no "
        f"backbone output is computed from exactly the {len(frozen)} frozen blocks, so "
        f"there is nothing to cache (the cut falls inside a stage). Use last:N for N in "
        f"{valid}, or config.train.cache_features=False.")
  return starts[-1]


def run_segments(segments: Sequence[Segment], x: jax.Array, start: Optional[str] = None,
                 stop: Optional[str] = None) -> dict[str, jax.Array]:
  """Runs the segments after `start` (all when None) through `stop` (the last when None).

  Args:
    segments: (name, fn) pairs in forward order; fn maps the previous output to this one.
    x: the backbone's input images, or the `start` output when `start` is given.
    start: name of the output `x` is; the run begins with the segment after it.
    stop: name of the last output to compute.

  Returns:
    {name: output} for every segment that ran, in forward order.
  """
  names = output_names(segments)
  first = 0 if start is None else _position(names, start, "start") + 1
  last = len(names) - 1 if stop is None else _position(names, stop, "stop")
  if last < first:
    raise ValueError(f"stop={stop!r} comes before the first segment after "
                     f"start={start!r}; the outputs are ordered {', '.join(names)}.")
  out = {}
  for name, fn in segments[first:last + 1]:
    x = fn(x)
    out[name] = x
  return out


class Backbone(nn.Module):
  """What every registry backbone is: these attributes, and
  `__call__(x, train=False, *, start=None, stop=None) -> {output name: array}` built
  on `run_segments`.

  Attributes:
    include_top: also return ImageNet 'logits' (a dropout before the classifier needs a
      'dropout' rng when train=True).
    fold_bn: BN folded into convolutions (inference only; see fgjax.export).
    conv_impl: how convolutions and pools run (see fgjax.models.layers.Conv2D).
    dtype: computation dtype (params stay float32).
  """
  include_top: bool = False
  fold_bn: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

