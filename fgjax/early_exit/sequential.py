"""Sequential early-exit inference that skips the work after the exit (Savchenko 2021).

The backbone runs segment by segment (fgjax.models.segments: `start=` the previous
exit's output, `stop=` this exit's): segment m computes its stage map, the exit branch
(pooling.exit_features: global average pooling, l2-normalisation; then the exit's
classifier, heads.scores) and
hands the map to segment m + 1 only for the images that did not exit. An image exits
at the first m whose top score exceeds the threshold s_m (eq. 3); the last exit always
answers. Nothing past an image's exit runs for it:

  seq = Sequential(backbone, backbone_variables, exits=('stage4', 'stage6', 'map'),
                   heads=heads, thresholds=s)
  out = seq(images)   # {'label' (N,), 'exit' (N,) exit index, 'score' (N,),
                      #  'scores' (N, C) of the answering exit}

Batches are compacted: the images still running after exit m continue as a smaller
batch, padded up to the next bucket size (1, 2, 4, ..., max_batch), so each segment
compiles once per bucket and serving never recompiles (`warm_up` compiles them all
ahead of traffic). `calls` counts segment runs per exit: the test that nothing past an
exit runs reads it.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np

from fgjax.early_exit import heads as heads_lib
from fgjax.models import xla_cpu
from fgjax.models.pooling import exit_features


def buckets(max_batch: int) -> tuple[int, ...]:
  """Powers of two below `max_batch`, then `max_batch`: the compiled batch sizes."""
  if max_batch < 1:
    raise ValueError(f"max_batch={max_batch} must be >= 1.")
  sizes = []
  size = 1
  while size < max_batch:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_batch,)


class Sequential:
  """Segment-by-segment inference with per-exit thresholds (see the module doc).

  Args:
    backbone: a registry backbone module (called with start= / stop=).
    variables: its {'params', 'batch_stats'}.
    exits: M backbone output names in forward order (e.g. stage names and 'map').
    heads: M heads (fgjax.early_exit.heads.ExitHead), one per exit.
    thresholds: (M,) s_m; the last is ignored (the last exit always answers). The
      attribute may be replaced (e.g. to sweep alpha): nothing recompiles.
    max_batch: the largest compiled batch; larger inputs run in chunks of it.
  """

  def __init__(self, backbone: Any, variables: dict[str, Any], exits: Sequence[str],
               heads: Sequence[heads_lib.ExitHead], thresholds: Any,
               max_batch: int = 32):
    exits = tuple(exits)
    thresholds = np.asarray(thresholds, np.float64).reshape(-1)
    if not exits or len(heads) != len(exits) or len(thresholds) != len(exits):
      raise ValueError(f"need one head and one threshold per exit: {len(exits)} exits, "
                       f"{len(heads)} heads, {len(thresholds)} thresholds.")
    if len(set(exits)) != len(exits):
      raise ValueError(f"exits {exits} name a backbone output twice.")
    self.exits, self.thresholds = exits, thresholds
    self.buckets = buckets(max_batch)
    self.calls = [0] * len(exits)
    # On the device once: host (NumPy) variables would be copied in at every segment
    # call, all of them, whichever the segment uses.
    self._variables = jax.device_put(variables)
    self._segments = []
    for m, name in enumerate(exits):
      # The head's arrays are compile-time constants of its segment: serving never
      # changes them.
      def segment(v, x, start=exits[m - 1] if m else None, stop=name, head=heads[m]):
        stage = backbone.apply(v, x, train=False, start=start, stop=stop)[stop]
        return stage, heads_lib.scores(head, exit_features(stage))
      self._segments.append(xla_cpu.jit(segment))
    self._take = jax.jit(lambda a, rows: a[rows])

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def _rows(self, keep: np.ndarray) -> np.ndarray:
    """`keep` padded with row 0 up to its bucket: the gather of the survivors."""
    rows = np.zeros(self._bucket(len(keep)), np.int32)
    rows[:len(keep)] = keep
    return rows

  def warm_up(self, image_shape: tuple[int, int, int]) -> None:
    """Compiles every (segment, bucket) and every compaction (bucket -> smaller or
    equal bucket) for images of `image_shape` (H, W, 3) now."""
    for size in self.buckets:
      # Host images, as __call__ passes them: a device array would compile another
      # entry of the first segment.
      x = np.zeros((size,) + tuple(image_shape), np.float32)
      for m in range(len(self.exits)):
        x, _ = self._segments[m](self._variables, x)
        if m < len(self.exits) - 1:
          for keep in (b for b in self.buckets if b <= size):
            self._take(x, self._rows(np.arange(keep)))
    self.calls = [0] * len(self.exits)

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or not len(images):
      raise ValueError(f"early-exit inference expects (N >= 1, H, W, C) images, got "
                       f"{images.shape}.")
    step = self.buckets[-1]
    parts = [self._chunk(images[i:i + step]) for i in range(0, len(images), step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _chunk(self, images: np.ndarray) -> dict[str, np.ndarray]:
    # Indexing device arrays eagerly costs ~0.7 ms per op (a third of a Lite0 segment
    # at batch 1), so slicing and compaction are one jitted gather per exit and the
    # scores come to the host whole.
    n = len(images)
    out: dict[str, Optional[np.ndarray]] = {
        "exit": np.zeros(n, np.int32), "label": np.zeros(n, np.int32),
        "score": np.zeros(n, np.float32), "scores": None}
    alive = np.arange(n)
    x = images[self._rows(alive)]
    last = len(self.exits) - 1
    for m in range(len(self.exits)):
      self.calls[m] += 1
      stage, scores = self._segments[m](self._variables, x)
      scores = np.asarray(scores)[:len(alive)]
      if out["scores"] is None:
        out["scores"] = np.zeros((n, scores.shape[1]), np.float32)
      top = scores.max(axis=1)
      done = np.ones(len(alive), bool) if m == last else top > self.thresholds[m]
      rows = alive[done]
      out["exit"][rows] = m
      out["label"][rows] = scores[done].argmax(axis=1)
      out["score"][rows] = top[done]
      out["scores"][rows] = scores[done]
      alive = alive[~done]
      if not len(alive):
        break
      x = self._take(stage, self._rows(np.flatnonzero(~done)))
    return out
