"""Random-access record sources: image files on disk, images in memory.

A source is a sequence: `len(source)` and `source[i] -> record` with
  {'image': uint8 (H, W, 3) RGB, 'label': int, 'index': int}
where `index == i` is the example's position within its split (the trainer uses it
as the id of the impostor the example owns). Every source also carries
`labels` (int32 (N,), so labels never need an image decode), `name`, `bad_files`
(files dropped when the source was built) and `read_failures`; file sources also
carry `paths` (the feature cache keys on them).

A file that fails to decode at iteration time (changed on disk, flaky network file
system) is replaced by the next readable example of the split with `valid=False`,
counted in `source.read_failures` and warned about, so a long run never dies on one
file.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from fgjax.data import transforms


class FileSource:
  """Images decoded from files on access; see the module docstring for records."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], name: str = "",
               bad_files: Sequence[str] = ()):
    if len(paths) != len(labels):
      raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    self.paths = [str(p) for p in paths]
    self.labels = np.asarray(labels, np.int32).reshape(-1)
    self.name = name
    self.bad_files = list(bad_files)
    self.read_failures: list[str] = []  # Per process: grain workers count their own.

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self.paths)
    i = int(i)
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.name or 'source'} of size {n}.")
    for k in range(n):
      j = (i + k) % n
      try:
        image = transforms.decode_image(self.paths[j])
      except Exception as e:  # pylint: disable=broad-except
        self.read_failures.append(self.paths[j])
        warnings.warn(f"fgjax.data: cannot decode {self.paths[j]} ({e!r}); substituting "
                      "the next readable example of the split (valid=False).",
                      RuntimeWarning, stacklevel=2)
        continue
      rec = {"image": image, "label": int(self.labels[j]), "index": j}
      if j != i:
        rec["valid"] = False
      return rec
    raise OSError(f"no file of {self.name or 'source'} can be decoded any more "
                  f"(first: {self.paths[0] if n else None}).")

  def __repr__(self) -> str:
    return f"FileSource(name={self.name!r}, len={len(self)})"


class ArraySource:
  """Images held in memory: uint8 (N, H, W, 3) and labels (N,)."""

  def __init__(self, images: np.ndarray, labels: Sequence[int], name: str = ""):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                       f"{images.shape}.")
    self.images = images
    self.labels = np.asarray(labels, np.int32).reshape(-1)
    if len(self.labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(self.labels)} labels.")
    self.name = name
    self.bad_files: list[str] = []
    self.read_failures: list[str] = []

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {self.name or 'source'} of size "
                       f"{len(self)}.")
    return {"image": self.images[i], "label": int(self.labels[i]), "index": i}

  def __repr__(self) -> str:
    return f"ArraySource(name={self.name!r}, len={len(self)})"
