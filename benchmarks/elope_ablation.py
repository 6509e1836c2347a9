"""ELoPE's ablation (Table 5) on a folder data set, EfficientNet-Lite0.

  python benchmarks/elope_ablation.py --dataset=cars196 --workdir=/work/runs/elope \
      [--epochs=30 --lrs=3e-4,1e-3,3e-3 --module_epochs=5 --rows=gap,gmp,...] \
      [--trainable=last:2]

Rows, each a `train_and_evaluate` run (results.json in its workdir; a finished run is
not repeated, so the sweep resumes after a kill, and the summary is rebuilt from the
runs), learning rate chosen on val among --lrs, test reported for that choice only:
  gap, gmp, gkmp     pooling avg / max / kmax (K = 4), net 'elope' (FC 512 + classifier,
                     like the paper's baselines), cross-entropy only
  gkmp_lw            + L_w (ELoPE eq. 9): the 'elope' term with gamma = 0
  gkmp_le            + L_e = L_w + L_b (eq. 5-10), lambda 2 (Table 2)
  localization       + the localization module: trained on the best gkmp_le run
                     (--module_epochs, images, classifier frozen), then the head again on
                     the crops its boxes give (features cached once per split)
  weighted           + weighted k-max pooling (eq. 4): --weighted_epochs more on top of
                     the localization run (init_from)
  fixed_gkmp_le, loose_gkmp_le
                     k-max + L_e under the impostor rule (net 'impostor', RBF rule)
  gkmp_le_more, localization_more
                     controls for the two rows that start from a trained head:
                     gkmp_le's head trained --epochs more on the full images (lr
                     chosen on val like the localization row's), and the
                     localization row's --weighted_epochs more with plain k-max, so a
                     gain from crops or weights is not one from training longer
Training depth (--trainable, the same for every row): 'head' keeps the backbone at its
ImageNet weights; 'last:N' also trains its last N blocks (N ending a stage: 1, 2, 6, ...
for Lite0), on cached outputs of the blocks before them. Either way every row trains
for --epochs on cached features of unaugmented images: the same budget. The module of
the localization row always trains with the backbone frozen (ELoPE section 5). Runs of
a depth other than 'head' go to <workdir>/<dataset>_last<N>. Prints a Markdown table
and writes summary_<dataset>.json as rows finish.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sweep_rows  # noqa: E402
from configs import common  # noqa: E402

ROWS = ("gap", "gmp", "gkmp", "gkmp_lw", "gkmp_le", "localization", "weighted",
        "fixed_gkmp_le", "loose_gkmp_le", "gkmp_le_more", "localization_more")
_DATASET = flags.DEFINE_enum("dataset", "cars196", ["cars196", "birds525"], "Data set.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/elope", "Parent workdir.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Head-training epochs of every row.")
_MODULE_EPOCHS = flags.DEFINE_integer("module_epochs", 5,
                                      "Epochs of localization-module training.")
_WEIGHTED_EPOCHS = flags.DEFINE_integer("weighted_epochs", 10,
                                        "Weighted k-max fine-tuning epochs.")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "3e-4", "1e-3", "3e-3"],
                         "Learning rates to choose from (on val).")
_ROWS = flags.DEFINE_list("rows", list(ROWS), "Rows to run, in order.")
_TRAINABLE = flags.DEFINE_string("trainable", "head",
                                 "config.model.trainable of every row: head or last:N.")
_CACHE = flags.DEFINE_string("feature_cache_dir", "", "Shared feature cache (default: "
                             "<workdir>/<dataset>/features).")


def base(lr: float):
  c = common.elope(_DATASET.value, learning_rate=lr)
  c.train.num_epochs = _EPOCHS.value
  c.model.trainable = _TRAINABLE.value
  c.train.feature_cache_dir = _CACHE.value or os.path.join(_WORKDIR.value,
                                                           _DATASET.value, "features")
  c.train.checkpoint_every_steps = 1000
  return c


def row_config(row: str, lr: float, done: dict):
  """The config of `row` at learning rate `lr`; `done` holds the finished rows."""
  c = base(lr)
  if row in ("gap", "gmp", "gkmp"):
    c.model.pooling = {"gap": "avg", "gmp": "max", "gkmp": "kmax"}[row]
    c.loss.extra_terms = ""
  elif row == "gkmp_lw":
    c.loss.elope.gamma = 0.0
  elif row == "localization":
    c.model.net = "elope_localized"
    c.init_from = done["module"]["workdir"]
  elif row == "weighted":
    c.model.net = "elope_localized"
    c.model.pooling = "weighted_kmax"
    c.train.num_epochs = _WEIGHTED_EPOCHS.value
    c.init_from = done["localization"]["workdir"]
    c.init_from_parts = "net,loss_state"
  elif row == "gkmp_le_more":
    # As the localization row: the head continues, the class means restart.
    c.init_from = done["gkmp_le"]["workdir"]
  elif row == "localization_more":
    c.model.net = "elope_localized"
    c.train.num_epochs = _WEIGHTED_EPOCHS.value
    c.init_from = done["localization"]["workdir"]
    c.init_from_parts = "net,loss_state"
  elif row in ("fixed_gkmp_le", "loose_gkmp_le"):
    c.scheme = row.split("_")[0]
    c.model.net = ""
  return c


def module_config(classifier_workdir: str):
  """Stage 2 of the localization row: only the module trains, on images (lr 1e-3)."""
  c = base(1e-3)
  c.model.net = "elope_localized"
  c.loss.terms, c.loss.extra_terms = "heatmap", ""
  c.model.frozen = "embed,classifier"
  c.model.trainable = "head"
  c.train.cache_features, c.train.feature_cache_dir = False, ""
  c.train.num_epochs = _MODULE_EPOCHS.value
  c.train.log_every_steps = 20
  c.init_from = classifier_workdir
  c.eval.localization = True
  return c


def _run(config, workdir: str) -> dict:
  from fgjax import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return train.train_and_evaluate(config, workdir)


def _scores(r: dict, split: str) -> dict:
  head = "rbf" if "rbf" in r["splits"][split] else "softmax"
  return {"head": head, **r["splits"][split][head]}


# The run a row continues from (its init_from), and rows that keep that run's lr.
_SOURCE = {"localization": "module", "weighted": "localization",
           "localization_more": "localization", "gkmp_le_more": "gkmp_le"}
_KEEP_LR = ("weighted", "localization_more")
# The row each row adds one part to (Table 5's steps, and the controls' references).
_ADDS_TO = {"gmp": "gap", "gkmp": "gmp", "gkmp_lw": "gkmp", "gkmp_le": "gkmp",
            "localization": "gkmp_le", "weighted": "localization",
            "fixed_gkmp_le": "gkmp_le", "loose_gkmp_le": "gkmp_le",
            "gkmp_le_more": "gkmp_le", "localization_more": "localization"}


def _paired(done: dict, row: str, other: str) -> str:
  """McNemar exact of two chosen rows on the test images: 'a / b, p'."""
  if other not in done:
    return "-"
  t = sweep_rows.paired(*({"workdir": done[r]["workdir"],
                           "classifier": done[r]["test"]["head"]} for r in (row, other)))
  return f"{other}: {t['only_a_right']} / {t['only_b_right']}, p = {t['p_value']:.2g}"


def _name(row: str, lr: float, done: dict) -> str:
  """Run directory: the row, its lr, and the run it continues (so a changed choice
  upstream never reuses a stale continuation)."""
  src = _SOURCE.get(row)
  return f"{row}_lr{lr:g}" + (f"__{os.path.basename(done[src]['workdir'])}" if src else "")


def main(argv):
  del argv
  depth = _TRAINABLE.value
  out_dir = os.path.join(_WORKDIR.value, _DATASET.value + (
      "" if depth == "head" else "_" + depth.replace(":", "")))
  os.makedirs(out_dir, exist_ok=True)
  summary_path = os.path.join(out_dir, f"summary_{_DATASET.value}.json")
  # The rows named in --rows are rebuilt from their runs' results.json (finished runs
  # cost nothing); the others keep their summary entries (rows upstream of them).
  done = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      done = json.load(f)
  for row in _ROWS.value:
    if row == "localization":
      wd = os.path.join(out_dir, f"module__{os.path.basename(done['gkmp_le']['workdir'])}")
      t0 = time.time()
      r = _run(module_config(done["gkmp_le"]["workdir"]), wd)
      done["module"] = {"workdir": wd, "wall_seconds": time.time() - t0,
                        "localization": r.get("localization"),
                        "test_top1_on_crops_untrained_head": _scores(r, "test")["top1"]}
    lrs = ([done[_SOURCE[row]]["lr"]] if row in _KEEP_LR
           else [float(x) for x in _LRS.value])
    trials = {}
    for lr in lrs:
      wd = os.path.join(out_dir, _name(row, lr, done))
      t0 = time.time()
      r = _run(row_config(row, lr, done), wd)
      trials[lr] = {"workdir": wd, "val": _scores(r, "val"), "test": _scores(r, "test"),
                    "wall_seconds": time.time() - t0, "sigma": r.get("sigma")}
    best = max(sorted(trials), key=lambda lr: trials[lr]["val"]["top1"])
    done[row] = {"lr": best, **trials[best],
                 "val_by_lr": {str(k): v["val"]["top1"] for k, v in trials.items()}}
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(done, f, indent=1)
    os.replace(tmp, summary_path)
    print(f"{row}: lr {best:g} val {done[row]['val']['top1']:.3f} "
          f"test {done[row]['test']['top1']:.3f}", flush=True)
  print(f"\n{_DATASET.value}, EfficientNet-Lite0 trainable={depth}, {_EPOCHS.value} epochs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}")
  print("| row | classifier | lr (val) | val top-1 by lr | val top-1 | test top-1 | "
        "test top-5 | McNemar vs the row it adds to (only this / only that right) | "
        "vs gap |")
  print("|---|---|---|---|---|---|---|---|---|")
  for row in ROWS:
    if row in done:
      d = done[row]
      by_lr = ", ".join(f"{float(k):g}: {v:.3f}" for k, v in sorted(
          d["val_by_lr"].items(), key=lambda kv: float(kv[0])))
      print(f"| {row} | {d['test']['head']} | {d['lr']:g} | {by_lr} | "
            f"{d['val']['top1']:.3f} | {d['test']['top1']:.3f} | {d['test']['top5']:.3f} "
            f"| {_paired(done, row, _ADDS_TO[row]) if row in _ADDS_TO else '-'} | "
            f"{_paired(done, row, 'gap') if row != 'gap' else '-'} |")


if __name__ == "__main__":
  app.run(main)
