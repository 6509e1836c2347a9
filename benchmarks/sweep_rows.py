"""Rows of a hyperparameter sweep: one finished run's numbers, the choice on val, and
McNemar's paired test of two chosen runs. Shared by the table scripts
(schemes_table.py, attention_table.py), which own their grids and flags; each group's
summary comes with a picture of val top-1 against the learning rate (lr_grid.png)."""

import json
import os
import re
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax import divergence  # noqa: E402
from fgjax import stats  # noqa: E402
from fgjax import visualize  # noqa: E402


def set_depth(c, depth: str, feature_cache_dir: str) -> None:
  """Trains `depth` of the backbone; head-only rows share cached backbone features."""
  c.model.trainable = depth
  c.train.cache_features = depth == "head"
  if c.train.cache_features and feature_cache_dir:
    c.train.feature_cache_dir = feature_cache_dir


def classifier(results: dict) -> str:
  """'rbf' for impostor networks, else 'softmax': the run's own classifier."""
  return "rbf" if "rbf" in results["splits"]["test"] else "softmax"


def _scores(split: dict, head: str) -> dict:
  # Extra softmax heads (config.eval.extra_logits) sit under 'heads'.
  return split[head] if head in ("rbf", "softmax") else split["heads"][head]


DIVERGED = "diverged.json"
NCA_SCHEMES = ("tied", "fixed", "loose")  # the schemes whose RBF width (sigma) matters


def train_sigma(workdir: str) -> Optional[float]:
  """The RBF width a run trained with, read from its config.json; None without NCA."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return config["loss"]["nca"]["sigma"] if config["scheme"] in NCA_SCHEMES else None


def train_run(config, workdir: str) -> None:
  """Trains one setting of a sweep. A run that diverges (fgjax.divergence) is a result
  of its setting, not a failure of the sweep: <workdir>/diverged.json records why, the
  sweep goes on to its next setting, and the table shows the rate as diverged."""
  from fgjax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, workdir)
  except divergence.TrainingDiverged as e:
    with open(os.path.join(workdir, DIVERGED), "w") as f:
      json.dump({"message": str(e)}, f, indent=1)
    print(f"{workdir}: {e}", flush=True)


def is_finished(workdir: str) -> bool:
  """A setting that trained to its end (results.json) or diverged (diverged.json)."""
  return any(os.path.exists(os.path.join(workdir, f)) for f in ("results.json", DIVERGED))


def diverged_row(name: str, lr: float, sigma: Optional[float], workdir: str) -> dict:
  """The sweep row of a diverged setting: no scores, the reason under 'diverged'."""
  with open(os.path.join(workdir, DIVERGED)) as f:
    why = json.load(f)["message"]
  return {"scheme": name, "lr": lr, "train_sigma": sigma, "workdir": workdir,
          "val_top1": None, "diverged": why}


def rows_of_run(workdir: str, lr: float, sigma: Optional[float],
                modes: dict[str, Optional[str]]) -> list[dict]:
  """The rows of one finished run: for each {row name: head} of `modes`, `row_of` that
  head (None: the run's own classifier), or `diverged_row` if the run diverged."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return [diverged_row(name, lr, sigma, workdir) for name in modes]
  with open(path) as f:
    results = json.load(f)
  return [row_of(name, lr, sigma, workdir, results, head=head)
          for name, head in modes.items()]


def val_cell(row: dict) -> str:
  return "diverged" if row.get("diverged") else f"{row['val_top1']:.3f}"


_RUN_NAME = re.compile(r"(?P<row>.+?)_lr(?P<lr>[0-9.eE+-]+)(?:_s(?P<sigma>[0-9.eE+-]+))?")


def finished_runs(group: str, rows) -> list[tuple[str, float, Optional[float], str]]:
  """(row, lr, sigma or None, workdir) of every finished run in `group`: a directory
  named `<row>_lr<lr>[_s<sigma>]` (the table scripts' names) that `is_finished`, for
  the rows in `rows`; in the order of `rows`, then by lr and sigma (grid order, for
  `choose`'s ties). The tables are built from these, so a call that trains one run
  reports it beside every run the group already holds instead of overwriting the
  group's summary with that one run."""
  found = []
  for name in os.listdir(group) if os.path.isdir(group) else []:
    m = _RUN_NAME.fullmatch(name)
    workdir = os.path.join(group, name)
    if m and m["row"] in rows and is_finished(workdir):
      sigma = None if m["sigma"] is None else float(m["sigma"])
      found.append((m["row"], float(m["lr"]), sigma, workdir))
  order = {row: i for i, row in enumerate(rows)}
  return sorted(found, key=lambda f: (order[f[0]], f[1], f[2] or 0.0))


def row_of(name: str, lr: float, sigma: Optional[float], workdir: str, results: dict,
           head: Optional[str] = None) -> dict:
  """The numbers of one finished run for a table: val/test top-1 of `head` (default:
  the run's own classifier), the test top-1's binomial SE, and where `head` is the
  main one, calibration (ECE, NLL; temperature-scaled for a softmax) and open set."""
  main = classifier(results)
  head = head or main
  test, val = results["splits"]["test"], results["splits"]["val"]
  n = int(test["num_examples"])
  row = {"scheme": name, "lr": lr, "train_sigma": sigma, "workdir": workdir,
         "classifier": head, "val_top1": _scores(val, head)["top1"],
         "test_top1": _scores(test, head)["top1"], "test_top5": _scores(test, head)["top5"],
         "test_top1_se": stats.binomial_se(_scores(test, head)["top1"], n),
         "test_images": n, "test_sigma": results.get("sigma") if head == "rbf" else None,
         "ece": None, "nll": None, "train_seconds": results.get("train_seconds")}
  cal = test["calibration"]
  if head in cal:
    row["ece"], row["nll"] = cal[head]["ece"], cal[head]["nll"]
  if head == "softmax" and "softmax_temperature" in cal:
    row["ece_temperature"] = cal["softmax_temperature"]["ece"]
    row["nll_temperature"] = cal["softmax_temperature"]["nll"]
  if "openset" in results and head == main:
    row["openset_ks"] = results["openset"]["ks"]
    row["openset_auroc"] = results["openset"]["auroc"]
  return row


def choose(rows: list[dict]) -> Optional[dict]:
  """The row with the best val top-1; the first in grid order on ties. Diverged rows
  are never chosen; None when every row diverged."""
  done = [(i, r) for i, r in enumerate(rows) if r["val_top1"] is not None]
  return max(done, key=lambda ir: (ir[1]["val_top1"], -ir[0]))[1] if done else None


def grid_edge(rows: list[dict], chosen: dict) -> Optional[str]:
  """'lowest' or 'highest' when the chosen rate is its grid's end (a better one may lie
  beyond it), None inside the grid or for a grid of one rate."""
  lrs = {r["lr"] for r in rows}
  if len(lrs) < 2:
    return None
  if chosen["lr"] == min(lrs):
    return "lowest"
  return "highest" if chosen["lr"] == max(lrs) else None


def paired(best: dict, baseline: dict) -> dict:
  """McNemar's exact test of two chosen rows on their test images (predictions.npz,
  key 'test_<classifier>' of each row)."""
  a = np.load(os.path.join(best["workdir"], "predictions.npz"))
  b = np.load(os.path.join(baseline["workdir"], "predictions.npz"))
  if not np.array_equal(a["test_label"], b["test_label"]):
    raise ValueError(f"{best['workdir']} and {baseline['workdir']} were tested on "
                     "different images; a paired test needs the same test split.")
  return stats.mcnemar(a[f"test_{best['classifier']}"],
                       b[f"test_{baseline['classifier']}"], a["test_label"])


def fmt(x, spec: str = ".3f") -> str:
  return "-" if x is None else format(x, spec)


def write_summary(group: str, summary: dict, text: str) -> None:
  """<group>/summary.json and <group>/table.md; for a summary with a "sweep" ({row:
  rows}) and its "chosen" rows, where some row tried several rates, also
  <group>/lr_grid.png (`visualize.lr_curves`)."""
  with open(os.path.join(group, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(group, "table.md"), "w") as f:
    f.write(text + "\n")
  sweep = summary.get("sweep", {})
  if not any(len({r["lr"] for r in rows}) > 1 for rows in sweep.values()):
    return
  chosen = {r["scheme"]: r for r in summary["chosen"]}
  labels = {}
  for name, rows in sweep.items():
    edge = grid_edge(rows, chosen[name]) if name in chosen else None
    if name not in chosen:
      labels[name] = f"{name} (diverged at every rate)"
    elif len({r["lr"] for r in rows}) == 1:
      labels[name] = f"{name} (one rate only)"
    else:
      labels[name] = name + (f" (chosen at the grid's {edge} rate)" if edge else "")
  try:
    visualize.lr_curves(os.path.join(group, "lr_grid.png"), sweep, labels,
                        {k: r["lr"] for k, r in chosen.items()}, os.path.basename(group))
  except ImportError:  # matplotlib is the optional 'plots' extra; the table stands alone
    pass
