"""Open-set unknowns from another data set, and the package's `get_splits`.

The impostor networks paper's open-set protocol (section 4.2) tests on images of the
training classes (Test1) and of another data set (Test2). `config.data.unknown_root`
names that other data set: a registered source (its test split) or any folder of
images. `get_splits` is `registry.get_splits` with those images as `Splits.unknown`
(label -1); it lives here, above the sources, because a named unknown source is built
through the registry like the training one.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from fgjax.data import folder
from fgjax.data import records
from fgjax.data import registry
from fgjax.data import splits
from fgjax.data import transforms


def get_splits(cfg: Any) -> splits.Splits:
  """registry.get_splits(cfg), with config.data.unknown_root as the unknown split."""
  result = registry.get_splits(cfg)
  spec = cfg.get("unknown_root", "") if hasattr(cfg, "get") else ""
  if not spec:
    return result
  if result.unknown is not None:
    raise ValueError("config.data.unknown_root and config.data.holdout_classes both "
                     "give unknown images; use one of the two.")
  source, names = unknown_images(spec, cfg)
  return dataclasses.replace(result, unknown=source, unknown_class_names=names)


def unknown_images(spec: str, cfg: Any) -> tuple[records.FileSource, list[str]]:
  """The unknown images of the paper's open-set protocol (section 4.2: Test2 = images
  of another data set), label -1, and a name for them.

  `spec` (config.data.unknown_root) is a registered source name (its test split, e.g.
  'birds525' against cars196), or a folder, every image under it (recursive; names
  ignored). Undecodable files are dropped as for any folder.
  """
  if spec in registry.source_names():
    if spec == cfg.get("source"):
      raise ValueError(f"config.data.unknown_root={spec!r} is the training data set "
                       "itself; name another one (or use config.data.holdout_classes).")
    other = registry.SOURCES.get(spec)(type(cfg)({"source": spec}))
    paths = list(getattr(other.test, "paths", []))
    if not paths:
      raise ValueError(f"config.data.unknown_root={spec!r}: its test split holds no "
                       "image files to use as unknowns.")
    name = f"{spec}:test"
  else:
    root = pathlib.Path(spec)
    if not root.is_dir():
      raise FileNotFoundError(
          f"config.data.unknown_root={spec!r} is neither a folder nor a data source "
          f"({', '.join(registry.source_names())}); point it at a folder of images.")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file()
                   and p.suffix.lower() in transforms.IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    bad = {b.split(": ", 1)[0] for b in folder.find_bad_files(paths)}
    paths = [p for p in paths if p not in bad]
    if not paths:
      raise ValueError(f"config.data.unknown_root={spec!r} holds no decodable image "
                       f"files ({', '.join(sorted(transforms.IMAGE_EXTENSIONS))}).")
    name = str(root)
  return records.FileSource(paths, [-1] * len(paths), name=f"unknown:{name}"), [name]
