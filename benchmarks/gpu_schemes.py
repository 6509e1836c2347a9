"""benchmarks/gpu.py's schemes part: train_and_evaluate on cars196 for each impostor
scheme, every layer training, a few epochs; val / test top-1 of each scheme's own
classifier (softmax for ce / ce_extra, the RBF rule otherwise), seconds and images/s."""

import dataclasses
import json
import os
import statistics
from typing import Any, Optional

SCHEMES = ("ce", "ce_extra", "tied", "fixed", "loose")
IMPOSTOR_SCHEMES = ("tied", "fixed", "loose")


@dataclasses.dataclass(frozen=True)
class Options:
  """The part's flags: epochs, batch size, data and weights paths (empty: fgjax's
  defaults), learning rates and training sigmas per scheme family, input workers, and
  toy runs on digits (smoke)."""
  epochs: int
  batch_size: int
  data_root: str
  weights_path: str
  lr_ce: float
  lr_impostor: float
  sigma: float
  sigma_loose: float
  workers: int
  smoke: bool


def scheme_config(scheme: str, options: Options):
  """cars196 (digits with --smoke) for `scheme`, every layer training."""
  from configs import common  # pylint: disable=g-import-not-at-top
  lr = options.lr_impostor if scheme in IMPOSTOR_SCHEMES else options.lr_ce
  sigma = options.sigma_loose if scheme == "loose" else options.sigma
  if options.smoke:
    from configs import digits_loose  # pylint: disable=g-import-not-at-top
    c = digits_loose.get_config()  # small_cnn at 8 px: the trainer's path in seconds
    c.scheme = scheme
    c.train.num_steps = 3
    c.train.log_every_steps = 1
    c.optim.learning_rate = 3e-3
    c.loss.nca.sigma = sigma
  else:
    c = common.folder_schemes("cars196", scheme, learning_rate=lr, sigma=sigma)
    c.train.num_epochs = options.epochs
    c.train.batch_size = options.batch_size
    c.train.log_every_steps = 10
    c.eval.batch_size = 128
    c.input.worker_count = options.workers
    if options.data_root:
      c.data.root = options.data_root
    if options.weights_path:
      c.model.weights_path = options.weights_path
  c.num_devices = 1
  c.model.trainable = "all"
  c.train.cache_features = False
  c.train.checkpoint_every_steps = 0  # one checkpoint at the end: nothing to resume
  c.export.int8_calibration_images = 0
  return c


def _check_data(config) -> None:
  """A clear error, before any compile, when the cars196 folder is not there."""
  if config.data.source != "cars196":
    return
  from fgjax.data import folder  # pylint: disable=g-import-not-at-top
  root = config.data.root or str(folder.shared_data_root("cars196"))
  if not os.path.isdir(os.path.join(root, "train")):
    raise FileNotFoundError(
        f"cars196 not found at {root}: the device machine gets the repository only; "
        "carry the folder (split/class/image) and pass --data_root=<it>.")


def _logged_images_per_s(workdir: str) -> Optional[float]:
  """Median images/s of the logged training intervals, the first (compile) left out."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rates = [r["images_per_sec"] for r in map(json.loads, f) if "images_per_sec" in r]
  rates = rates[1:] or rates
  return round(float(statistics.median(rates)), 2) if rates else None


def scheme_run(scheme: str, workdirs: str, options: Options) -> dict[str, Any]:
  """train_and_evaluate of one scheme into a fresh workdir; top-1 of its classifier."""
  import shutil  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  config = scheme_config(scheme, options)
  _check_data(config)
  workdir = os.path.join(workdirs, scheme)
  shutil.rmtree(workdir, ignore_errors=True)  # a new measurement, never a resume
  fallback = None
  try:
    results = train.train_and_evaluate(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not config.input.worker_count:
      raise
    # Worker processes may not start in a sandbox: one try in the training thread
    # rather than losing the run (the record says why).
    fallback = f"worker_count={config.input.worker_count} failed: {type(e).__name__}: {e}"
    config.input.worker_count = 0
    shutil.rmtree(workdir, ignore_errors=True)
    results = train.train_and_evaluate(config, workdir)
  head = "rbf" if scheme in IMPOSTOR_SCHEMES else "softmax"
  splits = results["splits"]
  steps, seconds = int(results["steps"]), float(results["train_seconds"])
  return {"scheme": scheme, "dataset": config.data.source,
          "backbone": config.model.backbone, "classifier": head,
          "learning_rate": float(config.optim.learning_rate),
          "train_sigma": float(config.loss.nca.sigma), "steps": steps,
          "batch_size": int(config.train.batch_size),
          "val_top1": splits["val"][head]["top1"] if "val" in splits else None,
          "test_top1": splits["test"][head]["top1"], "sigma": results.get("sigma"),
          "train_seconds": round(seconds, 2),
          # Includes compiling, the impostors' initial embeddings and checkpointing.
          "images_per_s_overall": round(steps * config.train.batch_size / seconds, 2),
          "images_per_s": _logged_images_per_s(workdir),
          "wall_seconds": round(float(results["wall_seconds"]), 2),
          "worker_count": int(config.input.worker_count), "workers_fallback": fallback,
          "workdir": workdir}
