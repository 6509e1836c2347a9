"""NCA loss forward + backward: this checkout against the same file at a git revision.

  python benchmarks/nca_revisions.py --rev HEAD [--reps 30] [--chunk_size 0]

Loads `fgjax/losses/nca.py` of `--rev` (git show) next to the working tree's, jits
`value_and_grad` of both (gradients w.r.t. queries and impostors) and times them
round-robin after 2 warm-ups (benchmarks/losses.py's shape: B = 256, M = 6,000,
d = 512, float32). Prints best / median ms per call and the loss values of both.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax.losses import nca as nca_now  # noqa: E402

_NCA = "fgjax/losses/nca.py"


def load_revision(rev: str):
  """The nca module as it was at `rev` (its relative imports resolved in fgjax.losses)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  source = subprocess.run(["git", "show", f"{rev}:{_NCA}"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "nca_at_rev.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("fgjax.losses.nca_at_rev", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rev", default="HEAD")
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--chunk_size", type=int, default=0, help="0: unchunked.")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  b, m, d, c = 256, 6000, 512, 200
  q = rng.standard_normal((b, d), np.float32)
  centers = rng.standard_normal((m, d), np.float32)
  q_labels = rng.integers(0, c, b).astype(np.int32)
  c_labels = rng.integers(0, c, m).astype(np.int32)
  exclude = rng.integers(0, m, b).astype(np.int32)
  kwargs = dict(sigma=16.0, exclude=exclude)
  if args.chunk_size:
    kwargs["chunk_size"] = args.chunk_size
  fns = {}
  for name, module in (("working tree", nca_now), (args.rev, load_revision(args.rev))):
    fn = jax.jit(jax.value_and_grad(
        lambda q, x, module=module: module.nca_loss(q, q_labels, x, c_labels,
                                                   **kwargs).mean(),
        argnums=(0, 1)))
    for _ in range(2):
      jax.block_until_ready(fn(q, centers))
    fns[name] = fn
  times = {name: [] for name in fns}
  for _ in range(args.reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(q, centers))
      times[name].append(time.perf_counter() - t0)
  print(f"{time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.2f}; "
        f"B={b} M={m} d={d} chunk_size={args.chunk_size or 'none'}, {args.reps} reps")
  for name, fn in fns.items():
    loss = float(fn(q, centers)[0])
    t = np.asarray(times[name]) * 1e3
    print(f"  {name:>14}: best {t.min():.1f} ms  median {np.median(t):.1f} ms  "
          f"loss {loss:.6f}")


if __name__ == "__main__":
  main()
