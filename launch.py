"""Trains and evaluates one experiment.

  python launch.py --config=configs/birds525_fixed.py --workdir=workdirs/run1 \
      [--config.train.num_epochs=10 ...]

Everything else lives in `fgjax.train.train_and_evaluate`, which tests call directly.
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file; override fields with --config.x.y=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.json; a run "
    "started again with the same workdir resumes.")
_RETAIN_FREED_MEMORY = flags.DEFINE_bool(
    "retain_freed_memory", True, "Let glibc malloc keep freed large blocks for reuse "
    "(fgjax.host_memory): XLA:CPU's per-step buffers then stop page-faulting, about "
    "0.1 s of a 0.6 s SqueezeNet train step. Process-wide; no-op off glibc.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops orbax's per-save INFO chatter so the training log shows progress lines."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _RETAIN_FREED_MEMORY.value:
    # First thing: it only reaches threads that have not allocated yet.
    from fgjax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.retain_freed_memory()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from fgjax import train  # Imported after flag parsing so --help stays fast.
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  summary = {split: {head: r[head] for head in ("rbf", "softmax") if head in r}
             for split, r in results["splits"].items()}
  logging.info("Results: %s", json.dumps(summary))
  print(json.dumps({"sigma": results["sigma"], "accuracy": summary}, indent=2))


if __name__ == "__main__":
  app.run(main)
