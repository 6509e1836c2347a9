"""Data sources by name: `@register('name')` and `get_splits(config.data)`.

A source is a function `cfg -> Splits` registered under the name that
`config.data.source` selects. fgjax/data/__init__.py imports the modules that
register the built-in sources (folder.py, digits.py, tfds.py); a new source is a
module with an `@register` function, imported there, never a branch here.
"""

from __future__ import annotations

from typing import Any, Callable

from fgjax import registries
from fgjax.data import splits

SourceFn = Callable[[Any], splits.Splits]
SOURCES = registries.Registry("data source", "config.data.source")
# Decorator: registers `fn(cfg) -> Splits` as `config.data.source=name`.
register = SOURCES.register
source_names = SOURCES.names


def get_splits(cfg: Any) -> splits.Splits:
  """Builds train / val / test (and unknown) sources from the config's `data` field.

  Args:
    cfg: ml_collections.ConfigDict (or dict) with the fields documented in
      fgjax/data/__init__.py.
  Returns:
    Splits.
  Raises:
    ValueError naming `config.data.<field>` for bad values, FileNotFoundError for
    missing data; both before any image is decoded for training.
  """
  if isinstance(cfg, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    cfg = ml_collections.ConfigDict(cfg)
  source_fn = SOURCES.get(cfg.get("source", None))
  # Fail on bad values before any I/O; class index ranges are checked once the
  # number of classes is known.
  splits.parse_split(cfg.get("split", "canonical"))
  splits.config_seed(cfg)
  for field in ("classes_subset", "holdout_classes"):
    splits.class_ids(cfg, field)
  return source_fn(cfg)
