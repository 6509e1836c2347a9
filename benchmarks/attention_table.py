"""Bilinear attention pooling and Coarse2Fine against the GAP baseline (issue 15).

One row per recipe, EfficientNet-Lite0 with its ImageNet weights frozen (trainable=
'head'), every row trained for the same --epochs at the same size; each row's learning
rate is chosen on val top-1 of its own classifier and test is reported once:

  gap              the plain ConvNet: GAP -> embedding -> softmax (Table 1's 'ce').
  bap              32 attention maps -> BAP part features -> softmax, CE only.
  bap_center       + the attention center loss (Coarse2Fine eq. 2-3, WS-DAN eq. 9).
  bap_center_orth  + the orthogonal init of the attention conv (Algorithm 1, l. 2-3).
  bap_loose        BAP part features -> d_em projection -> loose impostors (eq. 6).
  crop_drop        bap_center with WS-DAN's attention cropping and dropping (three
                   CE terms of 1/3 each; eval: raw and crop logits averaged).
  gap_aug,         gap and bap_center on crop_drop's inputs (uncached: random crop +
  bap_center_aug   flip every step): the controls that separate crop-drop's own
                   effect from the augmentation's.
  c2f              Coarse2Fine (configs/cars196_c2f.py), evaluated in all three
                   inference modes at once (config.eval.extra_logits): rows
                   c2f_coarse, c2f_fine, c2f_average.

gap and the bap rows train on cached backbone outputs (no augmentation, the backbone
runs once per split); crop_drop, c2f and the _aug rows run the backbone on every
step's images (random crop + flip as the pipeline gives, no cache). --schedule=cosine
decays every row's rate to 0 (the group directory says so): at a constant Adam rate
the BAP head on augmented inputs memorises the training set within two epochs and
then falls apart (BENCHMARKS 17). Finished runs are read, not retrained. --rows and
--lrs name the runs to train; the table (summary.json, table.md, lr_grid.png in the
group directory) covers every finished run the group holds, rewritten after each run:

  python benchmarks/attention_table.py --dataset=cars196 --epochs=30 \\
      --rows=gap,bap,bap_center,bap_center_orth,bap_loose --lrs=3e-4,1e-3 \\
      --workdir=/work/runs/attention --feature_cache_dir=/work/runs/fcache
"""

import os
import platform
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sweep_rows  # noqa: E402
from configs import cars196_c2f  # noqa: E402
from configs import common  # noqa: E402


def _bap(c, center=False, orth=False):
  c.model.net = "bap"
  c.model.attention_maps = 32
  c.model.attention_orthogonal_init = orth
  c.loss.terms = "ce,attention_center" if center else "ce"


def _bap_loose(c):
  _bap(c)
  c.scheme = "loose"
  c.model.net = "bap_impostor"
  c.loss.terms = ""
  c.loss.nca.sigma = 0.5  # the loose setting chosen on cars196 val (BENCHMARKS 16)


def _crop_drop(c):
  _bap(c, center=True)
  c.model.attention_crop_drop = True
  c.train.cache_features = False
  c.loss.terms = "ce,ce_crop,ce_drop,attention_center"
  for term in ("ce", "ce_crop", "ce_drop"):  # WS-DAN: the three CEs weigh 1/3 each
    c.loss[term].weight = 1.0 / 3.0


def _uncached(edit):
  def apply(c):
    edit(c)
    c.train.cache_features = False
  return apply


# Row name -> (config edit, the extra softmax heads whose modes become rows).
ROWS = {
    "gap": (lambda c: None, {}),
    "bap": (_bap, {}),
    "bap_center": (lambda c: _bap(c, center=True), {}),
    "bap_center_orth": (lambda c: _bap(c, center=True, orth=True), {}),
    "bap_loose": (_bap_loose, {}),
    "crop_drop": (_crop_drop, {}),
    "gap_aug": (_uncached(lambda c: None), {}),
    "bap_center_aug": (_uncached(lambda c: _bap(c, center=True)), {}),
    "c2f": (None, {"c2f_coarse": "coarse_logits", "c2f_fine": "fine_logits",
                   "c2f_average": "softmax"}),
}

_DATASET = flags.DEFINE_enum("dataset", "cars196", ["cars196", "birds525"], "Data set.")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows, of {sorted(ROWS)}.")
_LRS = flags.DEFINE_list("lrs", ["3e-4", "1e-3"], "Learning-rate grid of every row.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs of every row.")
_SCHEDULE = flags.DEFINE_enum("schedule", "constant", ["constant", "cosine"],
                              "Learning-rate schedule of every row (config.optim).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side (resize to 8/7 first).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/attention", "Parent of the runs.")
_FEATURE_CACHE = flags.DEFINE_string("feature_cache_dir", "",
                                     "Backbone outputs shared by the cached rows.")
_BASELINE = flags.DEFINE_string("baseline", "gap",
                                "The row every other row is paired with (McNemar).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only read finished workdirs and print the table.")


def config_for(row: str, lr: float):
  edit, _ = ROWS[row]
  if edit is None:  # c2f: its own config module, every mode evaluated
    c = cars196_c2f.coarse2fine(_DATASET.value, learning_rate=lr)
    c.eval.extra_logits = ("coarse_logits", "fine_logits")
  else:
    c = common.folder_schemes(_DATASET.value, "ce", learning_rate=lr)
    edit(c)
  if c.train.cache_features and _FEATURE_CACHE.value:
    c.train.feature_cache_dir = _FEATURE_CACHE.value
  c.train.num_epochs = _EPOCHS.value
  c.optim.schedule = _SCHEDULE.value
  # Uncached rows take seconds per step here (c2f's first checkpoint also keeps its
  # up-sampler pre-training, which a resume then skips): save them more often.
  c.train.checkpoint_every_steps = 500 if c.train.cache_features else 100
  c.input.image_size = _IMAGE_SIZE.value
  c.input.resize_size = _IMAGE_SIZE.value * 8 // 7
  c.data.unknown_root = ""
  c.export.int8_calibration_images = 0  # compared, not served
  return c


def group_dir() -> str:
  suffix = "" if _SCHEDULE.value == "constant" else f"_{_SCHEDULE.value}"
  return os.path.join(_WORKDIR.value,
                      f"{_DATASET.value}_{_IMAGE_SIZE.value}px_{_EPOCHS.value}ep{suffix}")


def markdown(chosen: list[dict], sweep: dict[str, list[dict]]) -> str:
  fmt = sweep_rows.fmt
  lines = [f"{_DATASET.value}, efficientnet_lite0 frozen (head), {_EPOCHS.value} epochs, "
           f"{_SCHEDULE.value} lr, "
           f"{_IMAGE_SIZE.value} px, {platform.node()} "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           "| row | lr: val top-1 |", "|---|---|"]
  for name, rows in sweep.items():
    lines.append(f"| {name} | " + ", ".join(f"{r['lr']:g}: {sweep_rows.val_cell(r)}"
                                           for r in rows) + " |")
  lines += ["", "| row | classifier | lr | val top-1 | **test top-1 ± SE** | test top-5 "
            "| ECE | train s |", "|" + "---|" * 8]
  for r in chosen:
    lines.append(
        f"| {r['scheme']} | {r['classifier']} | {r['lr']:g} | {r['val_top1']:.3f} | "
        f"**{r['test_top1']:.3f} ± {r['test_top1_se']:.3f}** | {r['test_top5']:.3f} | "
        f"{fmt(r['ece'])} | {fmt(r['train_seconds'], '.0f')} |")
  return "\n".join(lines)


def report(group: str) -> None:
  """Writes and prints the group's table over every finished run it holds."""
  sweep: dict[str, list[dict]] = {}
  # The baseline's row first (a stable sort), the others in ROWS order.
  order = sorted(ROWS, key=lambda row: row != _BASELINE.value)
  for row, lr, _, workdir in sweep_rows.finished_runs(group, order):
    # One table row per inference mode of the run (one for most recipes).
    for r in sweep_rows.rows_of_run(workdir, lr, sweep_rows.train_sigma(workdir),
                                    ROWS[row][1] or {row: None}):
      sweep.setdefault(r["scheme"], []).append(r)
  chosen = [c for c in map(sweep_rows.choose, sweep.values()) if c is not None]
  summary = {"chosen": chosen, "sweep": sweep}
  text = markdown(chosen, sweep)
  by_name = {r["scheme"]: r for r in chosen}
  base = _BASELINE.value
  if base in by_name:
    tests = {name: sweep_rows.paired(r, by_name[base]) for name, r in by_name.items()
             if name != base}
    summary["paired_vs_baseline"] = {"baseline": base, "tests": tests}
    text += f"\n\nMcNemar exact vs {base} (only row right / only {base} right, p): " + \
        "; ".join(f"{k} {t['only_a_right']}/{t['only_b_right']}, p = {t['p_value']:.2g}"
                  for k, t in tests.items())
  print(text)
  sweep_rows.write_summary(group, summary, text)


def main(argv):
  del argv
  unknown = sorted(set(_ROWS.value) - set(ROWS))
  if unknown:
    raise app.UsageError(f"--rows names {unknown}; rows are {sorted(ROWS)}.")
  group = group_dir()
  os.makedirs(group, exist_ok=True)
  for row in _ROWS.value:
    for lr in map(float, _LRS.value):
      workdir = os.path.join(group, f"{row}_lr{lr:g}")
      if not (_REPORT_ONLY.value or sweep_rows.is_finished(workdir)):
        sweep_rows.train_run(config_for(row, lr), workdir)
        report(group)  # after every run: a sweep cut short keeps its table
  report(group)


if __name__ == "__main__":
  app.run(main)
