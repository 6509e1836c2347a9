"""Accuracy vs bytes per impostor (paper Fig. 2 right) from birds525 result files.

  python benchmarks/plot_pq.py \
      --series='fixed (OPQ before training)=W_float,W_pq64,W_pq32,W_pq16,W_pq8' \
      --series='loose (OPQ after training)=...' --out=benchmarks/pq_accuracy.png

Each W is a workdir with the results.json of a run of benchmarks/birds525_schemes.py
(with --pq_bytes for the compressed ones); the float32 run of a series is drawn at
4 * d_em bytes. Prints a Markdown table of the same numbers.
"""

import json
import os

from absl import app
from absl import flags

_SERIES = flags.DEFINE_multi_string(
    "series", [], "'label=workdir,workdir,...' (one float32 run and its PQ runs).")
_OUT = flags.DEFINE_string("out", "benchmarks/pq_accuracy.png", "PNG path.")


def load(workdir):
  """(bytes per impostor, test top-1, val top-1, sigma) of one run."""
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  pq = r["config"]["impostors"]["pq_bytes"]
  nbytes = pq if pq else 4 * r["config"]["model"]["embed_dim"]
  return (nbytes, r["splits"]["test"]["rbf"]["top1"], r["splits"]["val"]["rbf"]["top1"],
          r["sigma"])


def main(argv):
  del argv
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  print("| series | bytes / impostor | val top-1 | test top-1 | sigma (val) |")
  print("|---|---|---|---|---|")
  for spec in _SERIES.value:
    label, _, dirs = spec.partition("=")
    points = sorted((load(w) for w in dirs.split(",") if w), reverse=True)
    for b, test, val, sigma in points:
      print(f"| {label} | {b} | {val:.3f} | {test:.3f} | {sigma:g} |")
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("bytes per impostor (2048 = float32, d_em = 512)")
  ax.set_ylabel("test top-1 (RBF rule)")
  ax.set_title("birds525, EfficientNet-Lite0 (head-only)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=100)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
