"""Per-impostor weights (NNGK review eq. 4 / 7) against none, on cars196 and birds525.

  python benchmarks/impostor_weights.py --workdir=/work/runs/weights \
      --feature_cache_dir=/work/runs/fcache

For every data set and impostor scheme, the run without weights and one run per
weights learning rate (config.impostors.weights_learning_rate), all else at the
scheme's setting chosen on val in BENCHMARKS sections 5 and 16 (EfficientNet-Lite0,
head only, 30 epochs). The weights' rate is chosen on val; test is reported once, with
McNemar's exact test of the chosen weighted run against the unweighted one. Finished
runs (results.json) are read, not retrained; <workdir>/table.md and summary.json are
rewritten after every run.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sweep_rows  # noqa: E402
from configs import common  # noqa: E402
from fgjax import train  # noqa: E402
from fgjax import workdir as workdir_lib  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/weights", "Parent of the runs.")
_FEATURE_CACHE = flags.DEFINE_string("feature_cache_dir", "", "Shared feature cache.")
_DATASETS = flags.DEFINE_list("datasets", ["cars196", "birds525"], "Folder data sets.")
_SCHEMES = flags.DEFINE_list("schemes", ["loose", "fixed"], "Impostor schemes.")
_RATES = flags.DEFINE_list("weights_lrs", ["1e-3", "1e-2"], "Weights learning rates.")

# (learning rate, training sigma) chosen on val: BENCHMARKS sections 16 and 5.
SETTINGS = {("cars196", "loose"): (3e-4, 0.5), ("cars196", "fixed"): (3e-5, 0.1),
            ("birds525", "loose"): (1e-4, 0.5), ("birds525", "fixed"): (1e-5, 0.2)}


def config_for(dataset: str, scheme: str, weights_lr: float):
  lr, sigma = SETTINGS[dataset, scheme]
  c = common.folder_schemes(dataset, scheme, learning_rate=lr, sigma=sigma)
  if _FEATURE_CACHE.value:
    c.train.feature_cache_dir = _FEATURE_CACHE.value
  c.export.int8_calibration_images = 0   # compared, not served
  c.impostors.weights = weights_lr > 0
  if weights_lr:
    c.impostors.weights_learning_rate = weights_lr
  return c


def run(dataset: str, scheme: str, weights_lr: float) -> dict:
  name = f"{dataset}_{scheme}_" + (f"w{weights_lr:g}" if weights_lr else "unweighted")
  workdir = os.path.join(_WORKDIR.value, name)
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    results = workdir_lib.read_json(done)
  else:
    results = train.train_and_evaluate(config_for(dataset, scheme, weights_lr), workdir)
  return sweep_rows.row_of(name, SETTINGS[dataset, scheme][0], weights_lr or None,
                           workdir, results)


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  lines = ["| data set | scheme | weights | weights lr | val top-1 | test top-1 ± SE | "
           "McNemar: right only with / only without weights, p |", "|---|---|---|---|---|---|---|"]
  summary = {}
  for dataset in _DATASETS.value:
    for scheme in _SCHEMES.value:
      plain = run(dataset, scheme, 0.0)
      weighted = [run(dataset, scheme, float(r)) for r in _RATES.value]
      best = sweep_rows.choose(weighted)
      test = sweep_rows.paired(best, plain)
      summary[f"{dataset}_{scheme}"] = {"unweighted": plain, "weighted": weighted,
                                        "chosen": best["scheme"], "mcnemar": test}
      lines.append(f"| {dataset} | {scheme} | none | - | {plain['val_top1']:.3f} | "
                   f"{plain['test_top1']:.3f} ± {plain['test_top1_se']:.3f} | |")
      for row in weighted:
        mark = " (chosen on val)" if row is best else ""
        paired = (f"{test['only_a_right']} / {test['only_b_right']}, "
                  f"p = {test['p_value']:.2g}" if row is best else "")
        lines.append(f"| {dataset} | {scheme} | learned{mark} | {row['train_sigma']:g} | "
                     f"{row['val_top1']:.3f} | {row['test_top1']:.3f} ± "
                     f"{row['test_top1_se']:.3f} | {paired} |")
      sweep_rows.write_summary(_WORKDIR.value, summary, "\n".join(lines))
      print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main)
