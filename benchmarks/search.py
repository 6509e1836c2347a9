"""Queries/s of fgjax.search backends on synthetic clustered impostors.

Pins the process to one CPU core (so "queries/s on one core" means that),
builds an exact (JAX) and a ScaNN index over M clustered d-dim points and
times `index.search(queries, k)` on a batch of queries. Reports top-1
neighbour agreement and recall@k of ScaNN against the exact backend.

Usage:
  flock /tmp/fgjax-bench.lock /work/venv/bin/python benchmarks/search.py \
      --sizes 6000,100000 [--dim 512] [--queries 1000] [--k 10]
"""

import argparse
import os
import time

# One core: pin before JAX/XLA create their thread pools.
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fgjax import search  # noqa: E402


def clustered(rng, m, d, b, points_per_cluster=50, noise=0.5):
  """M points around M/50 Gaussian clusters; queries from the same clusters."""
  num_clusters = max(1, m // points_per_cluster)
  centers = rng.standard_normal((num_clusters, d), dtype=np.float32)
  db = np.empty((m, d), np.float32)
  step = 100_000  # generate in slices to keep the float64 temporaries small
  for s in range(0, m, step):
    n = min(step, m - s)
    db[s:s + n] = centers[rng.integers(0, num_clusters, n)]
    db[s:s + n] += noise * rng.standard_normal((n, d), dtype=np.float32)
  q = centers[rng.integers(0, num_clusters, b)]
  q += noise * rng.standard_normal((b, d), dtype=np.float32)
  return db, q


def time_search(index, queries, k, repeats=3):
  out = index.search(queries, k)  # warm-up / compile
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(index.search(queries, k))
    best = min(best, time.perf_counter() - t0)
  return best, out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="6000,100000")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--leaves_to_search", type=int, default=None)
  parser.add_argument("--reorder", type=int, default=256)
  args = parser.parse_args()

  print(f"load average: {os.getloadavg()}")
  print(f"cores used: {sorted(os.sched_getaffinity(0))}, jax {jax.__version__}")
  print("| M | d | backend | config | build s | queries/s | top-1 agree | "
        f"recall@{args.k} |")
  print("|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for m in (int(s) for s in args.sizes.split(",")):
    db, q = clustered(rng, m, args.dim, args.queries)
    t0 = time.perf_counter()
    exact = search.build_index(db, "exact")
    t_build = time.perf_counter() - t0
    t, (_, idx_e) = time_search(exact, q, args.k)
    idx_e = np.asarray(idx_e)
    print(f"| {m} | {args.dim} | exact | chunk={exact.chunk_size} | "
          f"{t_build:.1f} | {len(q) / t:.0f} | 1.000 | 1.000 |", flush=True)
    del exact
    t0 = time.perf_counter()
    opts = {"reorder_num_neighbors": args.reorder}
    if args.leaves_to_search:
      opts["leaves_to_search"] = args.leaves_to_search
    scann = search.build_index(db, "scann", **opts)
    t_build = time.perf_counter() - t0
    t, (_, idx_s) = time_search(scann, q, args.k)
    idx_s = np.asarray(idx_s)
    top1 = np.mean(idx_s[:, 0] == idx_e[:, 0])
    recall = np.mean([len(set(a) & set(b)) / args.k
                      for a, b in zip(idx_s, idx_e)])
    config = ("brute force" if scann.brute_force else
              f"tree {scann.num_leaves} leaves, search "
              f"{scann.leaves_to_search}, AH d/b=2, reorder {args.reorder}")
    print(f"| {m} | {args.dim} | scann | {config} | {t_build:.1f} | "
          f"{len(q) / t:.0f} | {top1:.3f} | {recall:.3f} |", flush=True)
    del scann, db
  print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
  main()
