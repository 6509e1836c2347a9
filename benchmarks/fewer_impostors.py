"""Fewer impostors: test accuracy against impostor memory (issue 17, a deployment lever).

For each trained impostor run (its `artifact/` holds the network and the M impostors),
keeps M/2, M/4, M/8 (--fractions) of the impostors

  random   uniformly at random (fgjax.impostor_selection.keep_random), --seeds draws;
  random_per_class
           stratified: the fraction of each class, at least one per class
           (keep_random_per_class), --seeds draws: random with the class coverage
           of the two rules below;
  drop_best_predicted
           the NNGK review's rule (section 4.2): drop the impostors whose own label is
           best predicted by the others (leave-one-out RBF posterior at the run's own
           test sigma), never a class's last impostor (so a budget below one impostor
           per class stops at one per class);
  drop_worst_predicted
           the opposite order, for contrast (Wilson-style editing: the impostors the
           others disagree with go first), same class floor;

re-chooses the RBF rule's sigma on val for each subset (fgjax.evaluate.select_sigma,
the run's config.eval grid) and reports val and test top-1, the float32 bytes of the
kept impostors (M' * d * 4) and, for reference, what 16-byte PQ codes of them would
take (M' * 16, codes only, as the impostor paper's 92 KB). The network is not
retrained: this is the post-hoc lever.

Embeddings of val and test come from the run's own network on its cached backbone
features (train.Run(config).outputs with the run's config.json; head-only runs read
config.train.feature_cache_dir, so nothing but the heads runs).

Rows go to <out_dir>/rows.jsonl as they are computed (a killed run loses no finished
row and resumes, skipping rows already there); then <out_dir>/table.md and the plot.

  python benchmarks/fewer_impostors.py --out_dir=/work/runs/fewer/eval \\
      --runs=cars196:loose=W1,cars196:fixed=W2,birds525:loose=W3 \\
      --png=benchmarks/fewer_impostors.png
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax import evaluate  # noqa: E402
from fgjax import impostor_selection as selection  # noqa: E402
from fgjax import impostors as impostors_lib  # noqa: E402
from fgjax import workdir as workdir_lib  # noqa: E402

_RUNS = flags.DEFINE_list(
    "runs", [], "'label=workdir' of finished impostor runs; labels 'dataset:scheme' "
    "(e.g. 'cars196:fixed'): runs of one data set share a panel.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.5", "0.25", "0.125"],
                               "Fractions of the M impostors to keep.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"],
                           "Seeds of the random rules.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/work/runs/fewer/eval",
                               "Where rows.jsonl and table.md go.")
_PNG = flags.DEFINE_string("png", "benchmarks/fewer_impostors.png", "The plot.")
_PQ_BYTES = 16


def _row_key(row: dict) -> tuple:
  return (row["run"], row["rule"], row["fraction"], row["seed"])


def _load_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _append(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _run_outputs(workdir: str):
  """(impostors, {'val', 'test'} outputs, config, test sigma) of a finished run."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fgjax import artifact  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  results = workdir_lib.read_json(os.path.join(workdir, "results.json"))
  config = ml_collections.ConfigDict(workdir_lib.read_json(
      os.path.join(workdir, "config.json")))
  model = artifact.Model(os.path.join(workdir, "artifact"))
  if model.impostors is None or model.pq is not None:
    raise ValueError(f"{workdir}/artifact has no float impostors (a ConvNet or a "
                     "PQ-compressed run); this benchmark needs an impostor run.")
  run = train.Run(config)
  outputs = {s: run.outputs.outputs(model.variables, s, ("embedding",))
             for s in ("val", "test")}
  imps = impostors_lib.ImpostorSet(np.asarray(model.impostors.centers, np.float32),
                                   np.asarray(model.impostors.labels, np.int32))
  return imps, outputs, config, float(results["sigma"]), run.num_classes


def _evaluate(imps, kept, outputs, grid, num_classes) -> dict:
  subset = impostors_lib.ImpostorSet(imps.centers[kept], imps.labels[kept])
  sigma, _ = evaluate.select_sigma(outputs["val"]["embedding"], outputs["val"]["label"],
                                   subset, grid, num_classes)
  top1 = {}
  for split in ("val", "test"):
    lp = evaluate.rbf_log_probs(outputs[split]["embedding"], subset, sigma, num_classes)
    top1[split] = evaluate.topk_accuracy(lp, outputs[split]["label"], (1,))["top1"]
  m, d = subset.centers.shape
  return {"num_impostors": int(m), "float32_bytes": int(m * d * 4),
          "pq16_code_bytes": int(m * _PQ_BYTES), "sigma": sigma,
          "classes_with_impostors": int(len(np.unique(subset.labels))),
          "val_top1": top1["val"], "test_top1": top1["test"],
          "test_images": int(len(outputs["test"]["label"]))}


RULES = ("full", "random", "random_per_class", "drop_best_predicted",
         "drop_worst_predicted")


def _plan(fractions, seeds):
  yield "full", 1.0, 0
  for fraction in fractions:
    for rule in ("random", "random_per_class"):
      for seed in seeds:
        yield rule, fraction, seed
    yield "drop_best_predicted", fraction, 0
    yield "drop_worst_predicted", fraction, 0


def run_one(label: str, workdir: str, rows_path: str, done: set) -> None:
  fractions = [float(f) for f in _FRACTIONS.value]
  seeds = [int(s) for s in _SEEDS.value]
  plan = [p for p in _plan(fractions, seeds) if (label, *p) not in done]
  if not plan:
    return
  imps, outputs, config, test_sigma, num_classes = _run_outputs(workdir)
  m = len(imps.labels)
  grid = list(config.eval.sigma_grid) or [float(config.loss.nca.sigma)]
  posterior = None
  for rule, fraction, seed in plan:
    if rule == "full":
      kept = np.arange(m)
    elif rule == "random":
      kept = selection.keep_random(m, fraction, seed)
    elif rule == "random_per_class":
      kept = selection.keep_random_per_class(imps.labels, fraction, seed)
    else:
      if posterior is None:
        posterior = selection.leave_one_out_posterior(imps, test_sigma, num_classes)
      # drop_worst_predicted: the same drop rule on the reversed score.
      score = posterior if rule == "drop_best_predicted" else -posterior
      kept = selection.drop_best_predicted(
          score, imps.labels, m - max(1, int(round(fraction * m))))
    row = {"run": label, "workdir": workdir, "rule": rule, "fraction": fraction,
           "seed": seed, "total_impostors": m, "loo_sigma": test_sigma,
           **_evaluate(imps, kept, outputs, grid, num_classes)}
    _append(rows_path, row)
    print(json.dumps(row), flush=True)


def summarise(rows: list[dict]) -> list[dict]:
  """One line per (run, rule, fraction): mean and sd over seeds."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["run"], r["rule"], r["fraction"]), []).append(r)
  out = []
  for (run, rule, fraction), rs in groups.items():
    test = np.array([r["test_top1"] for r in rs])
    val = np.array([r["val_top1"] for r in rs])
    out.append({"run": run, "rule": rule, "fraction": fraction, "draws": len(rs),
                "num_impostors": float(np.mean([r["num_impostors"] for r in rs])),
                "float32_bytes": float(np.mean([r["float32_bytes"] for r in rs])),
                "pq16_code_bytes": float(np.mean([r["pq16_code_bytes"] for r in rs])),
                "classes": float(np.mean([r["classes_with_impostors"] for r in rs])),
                "sigma": [r["sigma"] for r in rs],
                "val_mean": float(val.mean()), "test_mean": float(test.mean()),
                "test_sd": float(test.std(ddof=1)) if len(rs) > 1 else 0.0,
                "test_images": rs[0]["test_images"]})
  return sorted(out, key=lambda s: (s["run"], -s["fraction"], RULES.index(s["rule"])))


def markdown(summary: list[dict]) -> str:
  lines = ["| run | rule | kept | impostors | classes covered | float32 KB | PQ-16 codes KB "
           "| val top-1 | test top-1 (mean ± sd over draws) | test sigma |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for s in summary:
    sd = f" ± {s['test_sd']:.3f}" if s["draws"] > 1 else ""
    sig = sorted(set(s["sigma"]))
    lines.append(
        f"| {s['run']} | {s['rule']} | {s['fraction']:g} | {s['num_impostors']:.0f} | "
        f"{s['classes']:.0f} | {s['float32_bytes'] / 1024:.0f} | "
        f"{s['pq16_code_bytes'] / 1024:.1f} | {s['val_mean']:.3f} | "
        f"{s['test_mean']:.3f}{sd} (n={s['draws']}) | "
        f"{', '.join(f'{x:g}' for x in sig)} |")
  return "\n".join(lines)


def plot(summary: list[dict], png: str) -> None:
  """One panel per data set (the label before ':'), one line per run and rule."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  panels = sorted({s["run"].split(":")[0] for s in summary})
  fig = Figure(figsize=(5.2 * len(panels), 4.0))
  FigureCanvasAgg(fig)
  colors = {"random": "C0", "random_per_class": "C1", "drop_best_predicted": "C2",
            "drop_worst_predicted": "C3"}
  for k, panel in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    runs = sorted({s["run"] for s in summary if s["run"].split(":")[0] == panel})
    for i, run in enumerate(runs):
      style = ("o-", "s--", "^:", "v-.")[i % 4]
      full = [s for s in summary if s["run"] == run and s["rule"] == "full"]
      for rule, color in colors.items():
        pts = sorted(full + [s for s in summary if s["run"] == run and s["rule"] == rule],
                     key=lambda s: s["float32_bytes"])
        ax.errorbar([p["float32_bytes"] / 1024 for p in pts],
                    [p["test_mean"] for p in pts], yerr=[p["test_sd"] for p in pts],
                    fmt=style, color=color, ms=4, capsize=3, label=f"{run}: {rule}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("float32 impostor memory (KB)")
    ax.set_ylabel("test top-1 (RBF rule, sigma re-chosen on val)")
    ax.set_title(panel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=100)


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  rows_path = os.path.join(_OUT_DIR.value, "rows.jsonl")
  for spec in _RUNS.value:
    label, sep, workdir = spec.partition("=")
    if not sep or not workdir:
      raise ValueError(f"--runs entry {spec!r} is not 'label=workdir'.")
    if not os.path.exists(os.path.join(workdir, "results.json")):
      raise ValueError(f"{workdir} has no results.json: train it first (launch.py) or "
                       "fix --runs.")
    done = {_row_key(r) for r in _load_rows(rows_path)}
    run_one(label, workdir, rows_path, done)
  summary = summarise(_load_rows(rows_path))
  text = markdown(summary)
  with open(os.path.join(_OUT_DIR.value, "table.md"), "w") as f:
    f.write(text + "\n")
  workdir_lib.write_json(os.path.join(_OUT_DIR.value, "summary.json"), summary)
  print(text)
  plot(summary, _PNG.value)
  print(f"wrote {_PNG.value}")


if __name__ == "__main__":
  app.run(main)
