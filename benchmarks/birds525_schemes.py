"""birds525: the five schemes under one budget, hyperparameters chosen on val only.

Runs `train_and_evaluate` for each scheme at one training depth and prints a Markdown
table of val/test top-1 (RBF rule for impostor schemes, softmax for ConvNets) with the
sigma chosen on val. Each run's workdir keeps its results.json.

  python benchmarks/birds525_schemes.py --depth=head --epochs=30 \
      --workdir=workdirs/bench_b525 [--schemes=ce,ce_extra,tied,fixed,loose]
"""

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sweep_rows  # noqa: E402
from configs import common  # noqa: E402

_DEPTH = flags.DEFINE_string("depth", "head", "'head', 'last:N' or 'all'.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs per scheme.")
_SCHEMES = flags.DEFINE_list("schemes", ["ce", "ce_extra", "tied", "fixed", "loose"],
                             "Schemes to run.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/bench_b525", "Parent workdir.")
_LR = flags.DEFINE_float("lr", 1e-3, "Learning rate (chosen on val).")
_SIGMA = flags.DEFINE_float("sigma", 0.2, "Training sigma of the NCA loss.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_PQ = flags.DEFINE_integer("pq_bytes", 0, "OPQ bytes per impostor (0: uncompressed).")
_HOLDOUT = flags.DEFINE_integer(
    "holdout_every", 0, "Open set: hold out every n-th class (0: none) as unknown.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the run directories.")
_RESET = flags.DEFINE_integer("reset_every_epochs", 10,
                              "Tied scheme: impostor reset period in epochs.")
_FEATURE_CACHE = flags.DEFINE_string(
    "feature_cache_dir", "", "Head-only runs: directory for backbone features shared by "
    "the runs (config.train.feature_cache_dir).")


def config_for(scheme: str):
  c = common.birds525(scheme, learning_rate=_LR.value)
  sweep_rows.set_depth(c, _DEPTH.value, _FEATURE_CACHE.value)
  c.train.num_epochs = _EPOCHS.value
  c.train.batch_size = _BATCH.value
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.optim.learning_rate = _LR.value
  c.loss.nca.sigma = _SIGMA.value
  c.input.image_size = _IMAGE_SIZE.value
  c.input.resize_size = max(_IMAGE_SIZE.value * 8 // 7, _IMAGE_SIZE.value)
  c.impostors.pq_bytes = _PQ.value
  c.impostors.reset_every_epochs = _RESET.value
  if _HOLDOUT.value:
    c.data.holdout_classes = tuple(range(0, 525, _HOLDOUT.value))
  return c


def main(argv):
  del argv
  from fgjax import train
  rows = []
  for scheme in _SCHEMES.value:
    workdir = os.path.join(_WORKDIR.value,
                           f"{scheme}_{_DEPTH.value.replace(':', '')}{_TAG.value}")
    t0 = time.time()
    r = train.train_and_evaluate(config_for(scheme), workdir)
    head = "rbf" if "rbf" in r["splits"]["test"] else "softmax"
    openset = r.get("openset", {})
    rows.append((scheme, head, r["splits"]["val"][head]["top1"],
                 r["splits"]["test"][head]["top1"], r["splits"]["test"][head]["top5"],
                 r.get("sigma"), time.time() - t0,
                 f"{openset['ks']:.3f}" if openset else "-",
                 f"{openset['auroc']:.3f}" if openset else "-"))
  print(f"\nbirds525, EfficientNet-Lite0, depth={_DEPTH.value}, epochs={_EPOCHS.value}, "
        f"lr={_LR.value}, train sigma={_SIGMA.value}, image {_IMAGE_SIZE.value}px, "
        f"{platform.node()} {time.strftime('%Y-%m-%d')}")
  print(f"pq_bytes={_PQ.value}, holdout_every={_HOLDOUT.value}")
  print("| scheme | classifier | val top-1 | test top-1 | test top-5 | sigma (val) | "
        "open-set KS | open-set AUROC | wall s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for scheme, head, val, test, top5, sigma, wall, ks, auc in rows:
    sig = f"{sigma:g}" if head == "rbf" else "-"
    print(f"| {scheme} | {head} | {val:.3f} | {test:.3f} | {top5:.3f} | {sig} | "
          f"{ks} | {auc} | {wall:.0f} |")
  with open(os.path.join(_WORKDIR.value,
                         f"summary_{_DEPTH.value.replace(':', '')}{_TAG.value}.json"),
            "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
