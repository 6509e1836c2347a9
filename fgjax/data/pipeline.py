"""Input pipeline: sources -> decoded, augmented, normalised host NumPy batches.

Determinism by construction: every batch is a pure function of
(source, seed, step). For training, step -> (epoch, slot) = divmod(step,
steps_per_epoch); the epoch's order is `np.random.default_rng([seed, epoch])
.permutation(N)`; example i's crop / flip comes from
`np.random.default_rng([seed, epoch, i])`. Hence
  * the output does not depend on worker_count (workers only compute batches),
  * `start_step=k` yields exactly the tail of the stream from step 0 (resume),
  * every epoch is reshuffled, and every batch is full (drop remainder).
Evaluation walks the source in order once; the last batch is padded to
batch_size with copies of the last example marked valid=False, so a jitted eval
step sees one shape.

Parallelism: grain (`MapDataset.range(steps).map(load batch)`), with
`IterDataset.mp_prefetch` over `worker_count` processes when worker_count > 0
(PIL decode and resize then run on all cores); 0 loads in the calling thread.
Workers return uint8 batches (4x smaller than float32 through shared memory); the
consumer normalises. grain starts workers with multiprocessing 'spawn', so a script
using worker_count > 0 needs the `if __name__ == "__main__":` guard (absl.app.run
scripts such as launch.py have it), and each worker pays a few seconds of imports
once. Outside absl.app.run, absl flags are marked parsed with their defaults
because grain reads them.

Multi-host: batch_size is the global batch; process p of P gets rows
[p * B / P, (p + 1) * B / P) of each global batch (defaults from jax), which the
trainer assembles with jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from fgjax.data import transforms


def steps_per_epoch(source: Any, batch_size: int) -> int:
  """Full training batches per epoch: floor(len(source) / batch_size) (drop remainder)."""
  _check_positive_int(batch_size, "batch_size")
  return len(source) // batch_size


def _check_positive_int(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


class _BatchLoader:
  """Builds the host batch of one step; picklable for grain worker processes."""

  def __init__(self, source: Any, *, train: bool, seed: int, batch_size: int,
               host_rows: tuple[int, int], image_size: int, resize_size: int,
               flip: bool):
    self.source = source
    self.train = train
    self.seed = int(seed)
    self.batch_size = batch_size
    self.host_rows = host_rows
    self.image_size = image_size
    self.resize_size = resize_size
    self.flip = flip
    # Evaluation batches carry ground-truth boxes (eval-transform coordinates) for
    # sources whose records have them (TFDS data sets with boxes).
    self.has_boxes = not train and bool(getattr(source, "has_boxes", False))
    self.n = len(source)
    self.steps_per_epoch = self.n // batch_size if train else 0
    self._perm_epoch = -1
    self._perm: Optional[np.ndarray] = None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:  # Cached: consecutive steps share an epoch.
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._perm_epoch = epoch
    return self._perm

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    lo, hi = self.host_rows
    if self.train:
      epoch, slot = divmod(step, self.steps_per_epoch)
      rows = self.permutation(epoch)[slot * self.batch_size + lo:
                                     slot * self.batch_size + hi]
      valid = np.ones(len(rows), bool)
    else:
      epoch = 0
      pos = np.arange(step * self.batch_size + lo, step * self.batch_size + hi)
      valid = pos < self.n
      rows = np.minimum(pos, self.n - 1)
    images, labels, indices, boxes = [], [], [], []
    for r, example in enumerate(rows):
      rec = self.source[int(example)]
      if not rec.get("valid", True):
        valid[r] = False  # The source substituted an unreadable file.
      if self.train:
        rng = np.random.default_rng([self.seed, epoch, int(example)])
        img = transforms.train_transform(rec["image"], image_size=self.image_size,
                                         resize_size=self.resize_size, flip=self.flip,
                                         rng=rng)
      else:
        img = transforms.eval_transform(rec["image"], image_size=self.image_size,
                                        resize_size=self.resize_size)
        if self.has_boxes:
          boxes.append(transforms.eval_box(rec["box"], image_size=self.image_size,
                                           resize_size=self.resize_size))
      images.append(img)
      labels.append(rec["label"])
      indices.append(rec["index"])
    batch = {
        "image": np.stack(images),  # uint8: 4x less to ship from worker processes.
        "label": np.asarray(labels, np.int32),
        "index": np.asarray(indices, np.int32),
        "valid": valid,
    }
    if boxes:
      batch["true_box"] = np.stack(boxes)
    return batch


def make_iterator(source: Any, *, batch_size: int, train: bool, seed: int,
                  image_size: int, resize_size: int, mean: Sequence[float],
                  std: Sequence[float], start_step: int = 0,
                  num_epochs: Optional[int] = None, worker_count: int = 0,
                  flip: bool = True, process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `source` for training or evaluation (paper section 4 transforms).

  Args:
    source: random-access records {'image': uint8 (H, W, 3), 'label', 'index'}.
    batch_size: global batch size B (divisible by process_count).
    train: True: per-epoch shuffle, random crop + flip, drop remainder, infinite
      unless num_epochs. False: fixed order, centre crop, one pass, padded.
    seed: shuffle and augmentation seed.
    image_size: crop side S; resize_size: side of the square resize (>= S).
    mean, std: 1 or 3 values in 0..255 pixel units: image = (x - mean) / std.
    start_step: training only: first step to yield (resume after k batches).
    num_epochs: training only: stop after this many epochs (None: never).
    worker_count: grain worker processes (0: load in the calling thread).
    flip: training only: random horizontal mirror (off for e.g. digits).
    process_index, process_count: this host's slice of each global batch
      (default jax.process_index() / jax.process_count()).
    prefetch: batches buffered per worker.
  Yields:
    dict(image=float32 (B/P, S, S, 3), label=int32 (B/P,), index=int32 (B/P,),
         valid=bool (B/P,)), and for evaluation of a source with `has_boxes`,
    true_box=float32 (B/P, 4): the object's box in the eval-transformed image.
  Raises:
    ValueError on bad arguments, before any image is decoded.
  """
  _check_positive_int(batch_size, "batch_size")
  _check_positive_int(image_size, "image_size")
  _check_positive_int(resize_size, "resize_size")
  if image_size > resize_size:
    raise ValueError(f"image_size={image_size} must be <= resize_size={resize_size} "
                     "(the crop is taken from the resized image).")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  if isinstance(worker_count, bool) or not isinstance(worker_count, (int, np.integer)) \
      or worker_count < 0:
    raise ValueError(f"worker_count must be an int >= 0, got {worker_count!r}.")
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
      or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
  if num_epochs is not None:
    _check_positive_int(num_epochs, "num_epochs")
  mean_arr = np.asarray(mean, np.float32).reshape(-1)
  std_arr = np.asarray(std, np.float32).reshape(-1)
  if mean_arr.shape not in ((1,), (3,)) or std_arr.shape not in ((1,), (3,)):
    raise ValueError(f"mean and std must have 1 or 3 values (0..255 pixel units), got "
                     f"{mean!r} and {std!r}.")
  if not np.all(np.isfinite(mean_arr)) or not np.all(std_arr > 0):
    raise ValueError(f"mean must be finite and std positive, got {mean!r} and {std!r}.")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count="
                     f"{process_count}.")
  n = len(source)
  if n == 0:
    raise ValueError(f"source {source!r} is empty.")
  per_host = batch_size // process_count
  host_rows = (process_index * per_host, (process_index + 1) * per_host)

  if train:
    spe = n // batch_size
    if spe < 1:
      raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples; "
                       "lower it (training drops the remainder).")
    stop = spe * num_epochs if num_epochs is not None else sys.maxsize
  else:
    if start_step:
      raise ValueError("start_step applies to training iterators only (train=True).")
    stop = math.ceil(n / batch_size)
  loader = _BatchLoader(source, train=train, seed=seed, batch_size=batch_size,
                        host_rows=host_rows, image_size=image_size,
                        resize_size=resize_size, flip=flip)
  if worker_count == 0:
    return _normalized((loader(step) for step in range(start_step, stop)),
                       mean_arr, std_arr)
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app.run (tests, notebooks)
    # they would raise UnparsedFlagAccessError, so accept the defaults.
    flags.FLAGS.mark_as_parsed()
  dataset = grain.MapDataset.range(start_step, stop).map(loader)
  # Batches are built inside the worker processes; threads would contend for the GIL.
  iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                      prefetch_buffer_size=1))
  iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=int(worker_count), per_worker_buffer_size=max(1, prefetch)))
  return _normalized(iter(iter_ds), mean_arr, std_arr)


def _normalized(batches: Iterator[dict[str, np.ndarray]], mean: np.ndarray,
                std: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """Normalises uint8 batch images in the consuming process (float32 is 4x larger)."""
  for batch in batches:
    yield {**batch, "image": transforms.normalize(batch["image"], mean, std)}
