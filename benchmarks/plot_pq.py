"""Accuracy vs bytes per impostor (paper Fig. 2 right) from birds525 result files.

  python benchmarks/plot_pq.py --uncompressed=WORKDIR --compressed=W64,W32,W16,W8 \
      --out=benchmarks/pq_accuracy.png

Each WORKDIR holds the results.json of a `fixed` run (benchmarks/birds525_schemes.py
with --pq_bytes); the uncompressed run is drawn at 4 * d_em bytes (float32).
"""

import json
import os

from absl import app
from absl import flags

_UNCOMPRESSED = flags.DEFINE_string("uncompressed", None, "Workdir of the float32 run.")
_COMPRESSED = flags.DEFINE_list("compressed", [], "Workdirs of the PQ runs.")
_OUT = flags.DEFINE_string("out", "benchmarks/pq_accuracy.png", "PNG path.")


def load(workdir):
  r = json.load(open(os.path.join(workdir, "results.json")))
  pq = r["config"]["impostors"]["pq_bytes"]
  nbytes = pq if pq else 4 * r["config"]["model"]["embed_dim"]
  return nbytes, r["splits"]["test"]["rbf"]["top1"], r["splits"]["val"]["rbf"]["top1"]


def main(argv):
  del argv
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  points = sorted(load(w) for w in _COMPRESSED.value)
  base = load(_UNCOMPRESSED.value) if _UNCOMPRESSED.value else None
  print("| bytes / impostor | test top-1 | val top-1 |\n|---|---|---|")
  for b, t, v in points + ([base] if base else []):
    print(f"| {b} | {t:.3f} | {v:.3f} |")
  fig = Figure(figsize=(5, 3.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="OPQ codes")
  if base:
    ax.axhline(base[1], color="gray", ls="--", label=f"float32 ({base[0]} B)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("bytes per impostor")
  ax.set_ylabel("test top-1")
  ax.set_title("birds525, fixed impostors, EfficientNet-Lite0 (head)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=100)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
