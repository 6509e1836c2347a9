"""Network outputs over the splits of a data set, and the batches a run trains on.

One object per run holds what turning data into network outputs needs: the splits, the
network, the device mesh and the input settings. It computes

  outputs(variables, split, keys)   the network's outputs `keys` for every example of
                                    'train' | 'val' | 'test' | 'unknown', in index order
                                    (evaluation transforms, one pass);
  train_embeddings(variables)       protocol step 2: the embedding of every training
                                    image, checked to be each image exactly once;
  train_batches(start_step)         the training stream from `start_step` (resumable).

Head-only runs (config.train.cache_features) never change the trunk (the backbone, and
for the localized network its box and crop; with trainable='last:N' the backbone up to
its last N blocks, which then run in the head), so the trunk outputs that the head
reads (`Network.reads`) are computed once per split from the run's initial variables
(config.init_from included), optionally kept on disk (fgjax.feature_cache), and
everything above then runs only the head: the same numbers, since the frozen
backbone's BatchNorm uses running statistics in both.
"""

from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import data
from fgjax import feature_cache
from fgjax import parallel
from fgjax.models import xla_cpu

SPLITS = ("train", "val", "test", "unknown")


class SplitOutputs:
  """Network outputs per split for one run (see the module docstring).

  Args:
    network: a fgjax.models.nets.Network.
    splits: fgjax.data.Splits.
    mesh: the device mesh; batches are split over it.
    config: the run config (input, train, eval, seed, model and data fields).
    trunk_variables: () -> the variables the cached trunk outputs come from (the run's
      initial ones); called once, when features are first needed.
    trunk_stamp: what else identifies those variables in the feature cache key (e.g.
      the init_from checkpoint).
  """

  def __init__(self, network, splits: data.Splits, mesh, config,
               trunk_variables: Callable[[], dict[str, Any]],
               trunk_stamp: Optional[dict[str, Any]] = None):
    self.network, self.splits, self.mesh, self.config = network, splits, mesh, config
    self._trunk_variables = trunk_variables
    self._trunk_stamp = trunk_stamp or {}
    self.cache_features = bool(config.train.cache_features)
    self.steps_per_epoch = data.steps_per_epoch(splits.train, config.train.batch_size)
    self._features: dict[str, dict[str, np.ndarray]] = {}
    self._forwards: dict[tuple, Any] = {}

  def source(self, split: str):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}.")
    return getattr(self.splits, split)

  def has(self, split: str) -> bool:
    src = self.source(split)
    return src is not None and len(src) > 0

  def _iterator(self, source, train: bool, start_step: int = 0) -> Iterator[dict]:
    c = self.config
    spec = self.network.spec
    return data.make_iterator(
        source, batch_size=c.train.batch_size if train else c.eval.batch_size,
        train=train, seed=c.seed, image_size=c.input.image_size,
        resize_size=c.input.resize_size, mean=spec.mean, std=spec.std,
        start_step=start_step, worker_count=c.input.worker_count, flip=c.input.flip)

  def _forward(self, keys: tuple[str, ...], heads: bool):
    """Jitted (variables, inputs) -> {key: output}; unread outputs are not computed."""
    if (keys, heads) not in self._forwards:
      network, repl = self.network, parallel.replicated(self.mesh)
      if heads:
        fn = lambda v, f: {k: network.head_apply(v, f)[k] for k in keys}  # noqa: E731
        self._forwards[keys, heads] = jax.jit(fn, out_shardings=repl)
      else:
        fn = lambda v, x: {k: network.module.apply(v, x, train=False)[k]  # noqa: E731
                           for k in keys}
        self._forwards[keys, heads] = xla_cpu.jit(fn, out_shardings=repl)
    return self._forwards[keys, heads]

  def _image_outputs(self, forward, variables, split: str) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in self._iterator(self.source(split), train=False):
      # Every host feeds its slice; label/index/valid are gathered like the outputs so
      # that rows line up on every host of a multi-host run.
      g = parallel.global_batch(batch, self.mesh)
      out = parallel.to_host(forward(variables, g["image"]))
      meta = {k: parallel.gather(g[k]) for k in ("label", "index", "valid", "true_box")
              if k in g}
      valid = meta.pop("valid").astype(bool)
      for k, v in {**out, **meta}.items():
        chunks.setdefault(k, []).append(np.asarray(v)[valid])
    if not chunks:
      raise ValueError(f"split {split!r} gave no batches: is it empty?")
    out = {k: np.concatenate(v) for k, v in chunks.items()}
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}

  def images(self, split: str, count: int, spread: bool = False) -> dict[str, np.ndarray]:
    """`count` examples of `split` as the network sees them in evaluation: 'image'
    (normalised NHWC), 'label', and 'true_box' where the source has boxes.

    The first `count`, or with `spread` `count` evenly spaced over the split (sources
    list a class's images together, so the first ones show few classes).
    """
    source = self.source(split)
    if spread and count < len(source):
      source = _Rows(source, np.linspace(0, len(source) - 1, count).round())
    out: dict[str, list] = {}
    for batch in self._iterator(source, train=False):
      keep = batch["valid"].astype(bool)
      for k, v in batch.items():
        out.setdefault(k, []).append(np.asarray(v)[keep])
      if sum(len(v) for v in out["label"]) >= count:
        break
    return {k: np.concatenate(v)[:count] for k, v in out.items() if k != "valid"}

  def backbone_features(self, split: str) -> dict[str, np.ndarray]:
    """The cached trunk outputs `network.reads` of a split, with 'label', 'index'."""
    if split not in self._features:
      keys = tuple(self.network.reads)
      module = self.network.module
      forward = xla_cpu.jit(
          lambda v, x: {k: module.apply(v, x, train=False, method="trunk")[k]
                        for k in keys},
          out_shardings=parallel.replicated(self.mesh))
      source = self.source(split)
      key = feature_cache.fingerprint(
          self.config, split, source, keys,
          {**self.network.trunk_config, **self._trunk_stamp,
           "weights": feature_cache.file_stamp(self.config.model.get("weights_path"))})
      self._features[split] = feature_cache.load_or_compute(
          self.config.train.get("feature_cache_dir", ""), key,
          lambda: self._image_outputs(forward, self._trunk_variables(), split), keys,
          write=jax.process_index() == 0)
    return self._features[split]

  def precompute_features(self) -> None:
    """Every split's cached backbone outputs, before any training state exists."""
    for split in SPLITS:
      if self.has(split):
        self.backbone_features(split)

  def mapped(self, fn: Callable[[Any, jax.Array], dict[str, jax.Array]], variables,
             split: str) -> dict[str, np.ndarray]:
    """fn(variables, images) -> {key: (B, ...)} over every example of `split` in
    evaluation (jitted once per `fn`, batches as in `outputs`), with 'label' and
    'index', in index order: for outputs the network does not name, e.g. the pooled
    stage features of early exits (fgjax.early_exit.fit)."""
    if ("mapped", fn) not in self._forwards:
      self._forwards["mapped", fn] = xla_cpu.jit(
          fn, out_shardings=parallel.replicated(self.mesh))
    return self._image_outputs(self._forwards["mapped", fn], variables, split)

  def outputs(self, variables, split: str, keys: Sequence[str],
              from_images: bool = False) -> dict[str, np.ndarray]:
    """Outputs `keys` (+ 'label', 'index', and 'true_box' for sources with ground-truth
    boxes when run on images) of every example of `split`, index order.

    from_images: run the whole network on the images even when the trunk is cached
    (for outputs outside the head, e.g. a localization module's boxes).
    """
    keys = tuple(keys)
    if not self.cache_features or from_images:
      return self._image_outputs(self._forward(keys, heads=False), variables, split)
    cached = self.backbone_features(split)
    inputs = {k: jnp.asarray(cached[k]) for k in self.network.reads}
    out = parallel.to_host(self._forward(keys, heads=True)(variables, inputs))
    return {**out, "label": cached["label"], "index": cached["index"]}

  def train_embeddings(self, variables) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (M, E) and labels (M,) of every training image (protocol step 2)."""
    out = self.outputs(variables, "train", ("embedding",))
    if not np.array_equal(out["index"], np.arange(len(self.splits.train))):
      raise RuntimeError("the impostor pass did not see every training image exactly "
                         "once.")
    return out["embedding"], out["label"]

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
    """Training batches from `start_step` on: augmented images, or cached features in
    a seeded per-epoch order. Either stream is a pure function of (seed, step)."""
    if not self.cache_features:
      return self._iterator(self.splits.train, train=True, start_step=start_step)
    return self._cached_batches(start_step)

  def _cached_batches(self, start_step: int) -> Iterator[dict[str, Any]]:
    cached = self.backbone_features("train")
    bs, m = self.config.train.batch_size, len(cached["label"])
    step = start_step
    while True:
      epoch, k = divmod(step, self.steps_per_epoch)
      perm = np.random.default_rng([self.config.seed, epoch]).permutation(m)
      idx = perm[k * bs:(k + 1) * bs]
      yield {"backbone": {r: cached[r][idx] for r in self.network.reads},
             "label": cached["label"][idx].astype(np.int32),
             "index": idx.astype(np.int32), "valid": np.ones(len(idx), bool)}
      step += 1


def per_split(outputs: SplitOutputs, variables, keys: Sequence[str],
              splits: Sequence[str] = ("val", "test")) -> dict[str, dict[str, np.ndarray]]:
  """{split: outputs} for the non-empty ones of `splits`."""
  return {s: outputs.outputs(variables, s, keys) for s in splits if outputs.has(s)}


class _Rows:
  """The records of `source` at `rows`, as a source (for the data pipeline)."""

  def __init__(self, source: Any, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows, np.int64)
    self.has_boxes = bool(getattr(source, "has_boxes", False))

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.rows[i])]
