"""Frozen-backbone outputs of a split, computed once and optionally kept on disk.

Head-only training (`config.model.trainable='head'`, `config.train.cache_features=True`)
never changes the backbone, so the backbone outputs its network's head reads (the
pooled features for 'avg' pooling, the last conv map for the others) are fixed for
every image: fgjax.split_outputs computes them once per split and runs only the head
afterwards, for training, impostor initialisation and evaluation alike. With
`trainable='last:N'` the cached output is the one before the last N backbone blocks
(fgjax.models.segments.tail_start), and those blocks run with the head. On CPU the
backbone pass is nearly all of such a run's time, so sweeps over learning rate, sigma,
scheme or PQ size pay it once when `config.train.feature_cache_dir` names a directory
shared by the runs.

An entry is keyed by everything that determines the features: backbone and weights
(path, size, modification time), which outputs, preprocessing sizes, the data config
and the split's size and labels (and file paths for image folders). Data files edited in place
without changing their paths are not detected: delete the directory then.
"""

import hashlib
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Bump when the preprocessing or the backbones change what a key's features are.
FORMAT_VERSION = 3
_META = ("label", "index")
# Data fields that never change a split's features: the unknown-images source adds a
# split of its own (keyed by its file paths) and leaves train, val and test as they are.
_NOT_IN_KEY = ("unknown_root",)


def file_stamp(path: Optional[str]) -> Optional[list]:
  """[absolute path, size, mtime] of a file, None without one: a key part for it."""
  if not path or not os.path.exists(path):
    return None
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def fingerprint(config: Any, split: str, source: Any, outputs: Sequence[str],
                trunk: dict[str, Any]) -> str:
  """Hex digest naming the trunk `outputs` of `split` of `source` under `config`.

  `trunk` describes what computes them: the network's trunk_config (backbone,
  pretrained, localizer settings), the weights file, an init_from checkpoint.
  """
  labels = np.asarray(getattr(source, "labels", np.zeros(0)))
  digest = hashlib.sha256()
  digest.update(json.dumps({
      "version": FORMAT_VERSION,
      "trunk": trunk,
      "image_size": int(config.input.image_size),
      "resize_size": int(config.input.resize_size),
      "data": {k: v for k, v in config.data.to_dict().items()
               if k not in _NOT_IN_KEY},
      "split": split,
      "outputs": sorted(outputs),
      "size": len(source),
  }, sort_keys=True, default=str).encode())
  digest.update(labels.astype(np.int64).tobytes())
  for path in getattr(source, "paths", ()):
    digest.update(path.encode() + b"\0")
  return digest.hexdigest()[:32]


def load_or_compute(cache_dir: str, key: str,
                    compute: Callable[[], dict[str, np.ndarray]], outputs: Sequence[str],
                    write: bool = True) -> dict[str, np.ndarray]:
  """The cached arrays under `key`, or `compute()`'s, stored for the next run.

  `compute` returns {output name: (N, ...) for each of `outputs`, 'label': (N,),
  'index': (N,)}. With an empty
  `cache_dir` nothing is read or written. The file is written atomically, so a run
  killed mid-write leaves no half file that a later run would trust.
  """
  if not cache_dir:
    return compute()
  path = os.path.join(cache_dir, f"features_{key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        return {k: f[k] for k in (*outputs, *_META)}
    except (OSError, ValueError, KeyError) as e:
      raise OSError(f"feature cache file {path} is unreadable ({e}); delete it (or "
                    "the whole config.train.feature_cache_dir) to recompute.") from e
  out = compute()
  if write:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **{k: out[k] for k in (*outputs, *_META)})
    os.replace(tmp, path)
  return out
