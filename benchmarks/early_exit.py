"""Sequential early exit (issue 16): accuracy and real CPU time, per exit and sequential.

Run on a finished workdir (its artifact and config; any scheme with a registry
backbone):
  python benchmarks/early_exit.py --workdir=/work/runs/int8/cars196_ce_lr1e-3 \
      --exits=stage4,stage6,map --out=cars196.json --png=cars196.png

For each exit head kind (svm, rbf): the exit heads and held-out wrong-class scores are
fitted on the training split (fgjax.early_exit.fit, delta 0.5, the run's seed), then on
the test split:
  - top-1 of each exit alone, and its ms per image (the backbone up to that exit + its
    head, jax.jit on 2 threads);
  - top-1 and ms per image of the trained network as it is (its own head: softmax or
    the RBF rule over its impostors);
  - sequential inference (fgjax.early_exit.sequential.Sequential, batch compaction)
    for both rules over the alpha grid: top-1, the share answered at each exit, and
    real ms per image at batch 1 and batch 32.
Top-1 of every row is over the whole test split; times are over `--time_images` test
images: every configuration runs one pass over them per round, round-robin over all
configurations (so they share the background load), after a warm-up pass; the median
of `--rounds` is kept. A PNG plots top-1 against ms per image at batch 1 and 32.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fgjax import artifact  # noqa: E402
from fgjax import data  # noqa: E402
from fgjax.data import transforms  # noqa: E402
from fgjax.early_exit import fit as fit_lib  # noqa: E402
from fgjax.early_exit import sequential  # noqa: E402
from fgjax.early_exit import thresholds as thresholds_lib  # noqa: E402
from fgjax.early_exit import training  # noqa: E402
from fgjax.models import pooling  # noqa: E402
from fgjax.models import xla_cpu  # noqa: E402

ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _images(model, source):
  size, resize = model.meta["image_size"], model.meta["resize_size"]
  for start in range(0, len(source), 64):
    recs = [source[i] for i in range(start, min(start + 64, len(source)))]
    images = np.stack([transforms.eval_transform(r["image"], image_size=size,
                                                 resize_size=resize) for r in recs])
    yield (transforms.normalize(images, model.mean, model.std),
           np.asarray([r["label"] for r in recs]))


def _features(model, source, exits):
  backbone = model.network.module.backbone
  bvars = training.backbone_variables(model.variables)
  fn = xla_cpu.jit(lambda v, x: {e: pooling.exit_features(o) for e, o in
                                 backbone.apply(v, x, train=False,
                                                stop=exits[-1]).items() if e in exits})
  parts, labels = {e: [] for e in exits}, []
  for x, y in _images(model, source):
    out = fn(bvars, x)
    for e in exits:
      parts[e].append(np.asarray(out[e]))
    labels.append(y)
  return [np.concatenate(parts[e]) for e in exits], np.concatenate(labels)


def _pass_ms(fn, x, batch):
  """ms per image of one pass of fn over x in batches of `batch`."""
  start = time.perf_counter()
  for i in range(0, len(x), batch):
    jax.block_until_ready(fn(x[i:i + batch]))
  return (time.perf_counter() - start) * 1e3 / len(x)


def _timed(jobs, x, rounds):
  """{key: median ms per image} of jobs {key: (fn, batch)}, after one warm-up pass
  each, timed round-robin (every job once per round) so that they share the
  machine's background load."""
  for fn, batch in jobs.values():
    _pass_ms(fn, x[:batch], batch)
  times = {k: [] for k in jobs}
  for _ in range(rounds):
    for k, (fn, batch) in jobs.items():
      times[k].append(_pass_ms(fn, x, batch))
  return {k: float(np.median(v)) for k, v in times.items()}


def _with_thresholds(seq, thresholds):
  def run(x):
    seq.thresholds = thresholds
    return seq(x)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--exits", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--png", default="")
  parser.add_argument("--heads", default="svm,rbf")
  parser.add_argument("--time_images", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  exits = tuple(args.exits.split(","))
  path = os.path.join(args.workdir, "artifact")
  model = artifact.Model(path)
  config = ml_collections.ConfigDict(json.load(open(os.path.join(path, "config.json"))))
  splits = data.get_splits(config.data)
  training.check_config(ml_collections.ConfigDict(dict(exits=exits, rule="adaptive")),
                        tuple(model.network.spec.outputs))
  t0 = time.time()
  train_f, train_y = _features(model, splits.train, exits)
  test_f, test_y = _features(model, splits.test, exits)
  print(f"# features in {time.time() - t0:.0f} s", flush=True)
  test_x = np.concatenate([x for x, _ in _images(model, splits.test)])
  timed = test_x[np.linspace(0, len(test_x) - 1, args.time_images).round().astype(int)]
  full_pred = np.concatenate([model.log_probs(x).argmax(1) for x, _ in
                              _images(model, splits.test)])
  out = {"workdir": args.workdir, "exits": list(exits), "test_images": int(len(test_y)),
         "time_images": int(len(timed)), "rounds": args.rounds,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "full": {"top1": float((full_pred == test_y).mean())}, "heads": {}}
  jobs = {("full", b): (model.log_probs, b) for b in (1, 32)}
  bvars = training.backbone_variables(model.variables)
  backbone = model.network.module.backbone
  for kind in args.heads.split(","):
    fitted = fit_lib.fit_exits(exits, train_f, train_y, len(model.class_names),
                               kind=kind, delta=0.5, seed=int(config.seed), options={})
    scores = fit_lib.exit_scores(fitted, test_f)
    rows = {"exit": [], "sequential": []}
    for m, e in enumerate(exits):
      alone = sequential.Sequential(backbone, bvars, exits[:m + 1], fitted.heads[:m + 1],
                                    [np.inf] * (m + 1))
      rows["exit"].append({"exit": e, "top1": float((scores[m].argmax(1) == test_y)
                                                    .mean())})
      jobs.update({(kind, "exit", m, b): (alone, b) for b in (1, 32)})
    seq = sequential.Sequential(backbone, bvars, exits, fitted.heads,
                                fitted.thresholds(0.1, "adaptive"))
    seq.warm_up(timed.shape[1:])
    for rule in thresholds_lib.RULES:
      for alpha in ALPHAS:
        thresholds = fitted.thresholds(alpha, rule)
        sim = fit_lib.simulate(scores, thresholds)
        rows["sequential"].append({
            "rule": rule, "alpha": alpha,
            "top1": float((sim["label"] == test_y).mean()),
            "exit_fraction": [float((sim["exit"] == m).mean())
                              for m in range(len(exits))]})
        jobs.update({(kind, rule, alpha, b): (_with_thresholds(seq, thresholds), b)
                     for b in (1, 32)})
    out["heads"][kind] = rows
  print(f"# timing {len(jobs)} jobs x {args.rounds} rounds", flush=True)
  ms = _timed(jobs, timed, args.rounds)
  for b in (1, 32):
    out["full"][f"ms_b{b}"] = ms["full", b]
    for kind, rows in out["heads"].items():
      for m, row in enumerate(rows["exit"]):
        row[f"ms_b{b}"] = ms[kind, "exit", m, b]
      for row in rows["sequential"]:
        row[f"ms_b{b}"] = ms[kind, row["rule"], row["alpha"], b]
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out["full"]), flush=True)
  if args.png:
    _plot(out, args.png)


def _plot(out, png):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, title in ((axes[0], "ms_b1", "batch 1"), (axes[1], "ms_b32", "batch 32")):
    ax.scatter([out["full"][key]], [out["full"]["top1"]], marker="*", s=160, c="k",
               label="full network", zorder=3)
    for kind, color in zip(out["heads"], ("tab:blue", "tab:orange")):
      rows = out["heads"][kind]
      ax.scatter([r[key] for r in rows["exit"]], [r["top1"] for r in rows["exit"]],
                 marker="s", c=color, label=f"{kind}: each exit alone")
      for r in rows["exit"]:
        ax.annotate(r["exit"], (r[key], r["top1"]), fontsize=7, xytext=(3, -8),
                    textcoords="offset points")
      for rule, style in (("adaptive", "-o"), ("fixed", "--^")):
        seq = [r for r in rows["sequential"] if r["rule"] == rule]
        ax.plot([r[key] for r in seq], [r["top1"] for r in seq], style, c=color,
                ms=4, label=f"{kind}: sequential, {rule}")
    ax.set_xlabel(f"ms per image ({title}, 2 threads, jax.jit)")
    ax.set_ylabel("test top-1")
    ax.set_title(f"{os.path.basename(out['workdir'].rstrip('/'))}: {title}")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  main()
