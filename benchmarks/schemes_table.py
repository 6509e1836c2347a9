"""The impostor paper's Table 1 on a folder data set: five schemes, one backbone, one depth.

Sweeps every scheme over a learning-rate grid (and, for the NCA schemes, a grid of
training sigmas), one workdir per setting, then chooses each scheme's setting on val
top-1 of its own classifier (RBF rule for impostor schemes, softmax for ConvNets; ties
go to the first setting in grid order) and reports test once for that choice:
top-1 with its binomial standard error, top-5, calibration (ECE, NLL; temperature
scaling for the softmax), open set against another data set (KS, AUROC of the
entropy) and McNemar's paired test of the best impostor scheme against the ConvNet.

A finished setting (its results.json exists) is read, not retrained, and the summary
is rewritten after every run, so a sweep killed mid-way resumes where it stopped and
loses nothing. The table covers every finished setting in the group directory, also
those of earlier calls with other --schemes, --lrs or --sigmas:

  python benchmarks/schemes_table.py --dataset=cars196 --depth=head --epochs=30 \\
      --lrs=1e-5,3e-5,1e-4,3e-4,1e-3 --sigmas=0.2,0.5 \\
      --workdir=/work/runs/table1 --feature_cache_dir=/work/runs/fcache
  python benchmarks/schemes_table.py ... --report_only   # the table from the workdirs
"""

import itertools
import os
import platform
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sweep_rows  # noqa: E402
from configs import common  # noqa: E402

_NCA_SCHEMES = sweep_rows.NCA_SCHEMES
_ALL_SCHEMES = ("ce", "ce_extra") + _NCA_SCHEMES
_OTHER = {"cars196": "birds525", "birds525": "cars196"}

_DATASET = flags.DEFINE_string("dataset", "cars196", "Folder data set (common.folder_schemes).")
_BACKBONE = flags.DEFINE_string("backbone", "efficientnet_lite0", "Backbone registry name.")
_DEPTH = flags.DEFINE_string("depth", "head", "'head', 'last:N' or 'all'.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs of every run.")
_SCHEMES = flags.DEFINE_list("schemes", list(_ALL_SCHEMES),
                             "Schemes to train; they lead the table's order.")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "3e-4", "1e-3"], "Learning-rate grid.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.2"], "Training-sigma grid of tied/fixed/loose.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Crop side; 0: the backbone's own input size (Lite0 224, Lite1 "
    "240, Lite2 260). Images are resized to 8/7 of it first.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_RESET = flags.DEFINE_integer("reset_every_epochs", 10,
                              "Tied scheme: impostor reset period in epochs.")
_UNKNOWN = flags.DEFINE_string(
    "unknown_root", "other", "Open-set unknown images: 'other' (birds525 for cars196 "
    "and back), '' for none, or a source name / folder.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/table1", "Parent of the runs.")
_FEATURE_CACHE = flags.DEFINE_string(
    "feature_cache_dir", "", "Head-only runs: backbone features shared by the runs.")
_CRITERION = flags.DEFINE_enum(
    "sigma_criterion", "top1", ["top1", "nll"], "How val picks the RBF rule's test "
    "sigma (config.eval.sigma_criterion); runs with 'nll' go to their own group.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the group directory.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only read finished workdirs and print the table.")


def _image_size() -> int:
  if _IMAGE_SIZE.value:
    return _IMAGE_SIZE.value
  from fgjax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
  variant = _BACKBONE.value.rsplit("_", 1)[-1]
  if _BACKBONE.value.startswith("efficientnet_lite") and variant in efficientnet_lite.VARIANTS:
    return efficientnet_lite.VARIANTS[variant].input_size
  return 224


def config_for(scheme: str, lr: float, sigma: float):
  c = common.folder_schemes(_DATASET.value, scheme, learning_rate=lr, sigma=sigma)
  c.model.backbone = _BACKBONE.value
  sweep_rows.set_depth(c, _DEPTH.value, _FEATURE_CACHE.value)
  c.train.num_epochs = _EPOCHS.value
  c.train.batch_size = _BATCH.value
  c.train.checkpoint_every_steps = 500
  size = _image_size()
  c.input.image_size = size
  c.input.resize_size = size * 8 // 7
  c.impostors.reset_every_epochs = _RESET.value
  unknown = _OTHER.get(_DATASET.value, "") if _UNKNOWN.value == "other" else _UNKNOWN.value
  c.data.unknown_root = unknown
  c.eval.sigma_criterion = _CRITERION.value
  # Sweep runs are compared, not served: no int8 calibration pass per run.
  c.export.int8_calibration_images = 0
  return c


def settings(scheme: str):
  sigmas = _SIGMAS.value if scheme in _NCA_SCHEMES else ["0.2"]
  return [(float(lr), float(s)) for lr, s in itertools.product(_LRS.value, sigmas)]


def run_dir(scheme: str, lr: float, sigma: float) -> str:
  group = f"{_DATASET.value}_{_BACKBONE.value}_{_DEPTH.value.replace(':', '')}"
  if _IMAGE_SIZE.value:
    group += f"_{_IMAGE_SIZE.value}px"
  if _CRITERION.value != "top1":
    group += f"_sigma{_CRITERION.value}"
  group += _TAG.value
  name = f"{scheme}_lr{lr:g}" + (f"_s{sigma:g}" if scheme in _NCA_SCHEMES else "")
  return os.path.join(_WORKDIR.value, group, name)


def markdown(chosen: list[dict], sweep: dict[str, list[dict]]) -> str:
  lines = [f"{_DATASET.value}, {_BACKBONE.value}, depth={_DEPTH.value}, "
           f"epochs={_EPOCHS.value}, {_image_size()} px, {platform.node()} "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           "| scheme | setting: val top-1 |", "|---|---|"]
  for scheme, rows in sweep.items():
    cells = ", ".join(
        f"lr {r['lr']:g}" + (f" s {r['train_sigma']:g}" if r["train_sigma"] else "")
        + f": {sweep_rows.val_cell(r)}" for r in rows)
    lines.append(f"| {scheme} | {cells} |")
  lines += ["", "| scheme | classifier | lr | train sigma | val top-1 | **test top-1 "
            "± SE** | test top-5 | test sigma | ECE | NLL | ECE / NLL, temp.-scaled | "
            "open-set KS | AUROC | train s |", "|" + "---|" * 14]
  fmt = sweep_rows.fmt
  for r in chosen:
    temp = (f"{r['ece_temperature']:.3f} / {r['nll_temperature']:.3f}"
            if "ece_temperature" in r else "-")
    lines.append(
        f"| {r['scheme']} | {r['classifier']} | {r['lr']:g} | "
        f"{fmt(r['train_sigma'], 'g')} | {r['val_top1']:.3f} | "
        f"**{r['test_top1']:.3f} ± {r['test_top1_se']:.3f}** | {r['test_top5']:.3f} | "
        f"{fmt(r['test_sigma'], 'g')} | {r['ece']:.3f} | {r['nll']:.3f} | {temp} | "
        f"{fmt(r.get('openset_ks'))} | {fmt(r.get('openset_auroc'))} | "
        f"{fmt(r['train_seconds'], '.0f')} |")
  return "\n".join(lines)


def report(group: str) -> None:
  """Writes and prints the group's table over every finished run it holds."""
  sweep: dict[str, list[dict]] = {}
  order = list(dict.fromkeys(_SCHEMES.value + list(_ALL_SCHEMES)))
  for scheme, lr, sigma, workdir in sweep_rows.finished_runs(group, order):
    sweep.setdefault(scheme, []).extend(
        sweep_rows.rows_of_run(workdir, lr, sigma, {scheme: None}))
  chosen = [c for c in map(sweep_rows.choose, sweep.values()) if c is not None]
  summary = {"chosen": chosen, "sweep": sweep}
  by_scheme = {r["scheme"]: r for r in chosen}
  impostor = [r for r in chosen if r["classifier"] == "rbf"]
  if "ce" in by_scheme and impostor:
    best = sweep_rows.choose(impostor)  # by val, like every other choice here
    summary["paired"] = {"best_impostor": best["scheme"], "baseline": "ce",
                         **sweep_rows.paired(best, by_scheme["ce"])}
  text = markdown(chosen, sweep)
  if "paired" in summary:
    p = summary["paired"]
    text += (f"\n\nPaired test on the {chosen[0]['test_images']} test images, "
             f"{p['best_impostor']} (best impostor scheme on val) vs ce: only "
             f"{p['best_impostor']} right on {p['only_a_right']}, only ce right on "
             f"{p['only_b_right']}, McNemar exact p = {p['p_value']:.3g}.")
  print(text)
  sweep_rows.write_summary(group, summary, text)


def main(argv):
  del argv
  group = os.path.dirname(run_dir("ce", 1.0, 1.0))
  os.makedirs(group, exist_ok=True)
  for scheme in _SCHEMES.value:
    for lr, sigma in settings(scheme):
      workdir = run_dir(scheme, lr, sigma)
      if not (_REPORT_ONLY.value or sweep_rows.is_finished(workdir)):
        sweep_rows.train_run(config_for(scheme, lr, sigma), workdir)
        report(group)  # after every run: a sweep cut short keeps its table
  report(group)


if __name__ == "__main__":
  app.run(main)
