"""Benchmark: NCA loss forward+backward, fgjax vs pytorch-metric-learning vs roofline.

Part 1 (B=256, M=6000, d=512, float32, CPU): the time of
`jax.jit(jax.value_and_grad(mean nca_loss))` (gradients w.r.t. queries and
centers), of a plain jitted autodiff NCA (no custom VJP), of
pytorch-metric-learning's NCALoss (forward + backward, torch threads = 2), and
of "the matmuls alone": the forward B x M x d distance matmul plus the two
backward matmuls (B x M) @ (M x d) and (M x B) @ (B x d): the roofline.

Part 2: chunked NCA for M = 100,000 and 1,000,000, each in its own subprocess
so its peak resident memory (VmHWM) and XLA's temp-buffer size are\nthat configuration's alone.

Run (serialised with other engineers' timing runs):
  flock /tmp/fgjax-bench.lock /work/venv/bin/python benchmarks/losses.py
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def _timeit(fn, reps, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times), statistics.median(times)


def _timeit_interleaved(fns, reps, warmup=2):
  """Best and median seconds of each fn, timed round-robin so load spikes from
  other processes hit every contender alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _data(b, m, d, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  # float32 straight from the generator: no float64 copy inflating ru_maxrss.
  q = rng.standard_normal((b, d), dtype=np.float32)
  c = rng.standard_normal((m, d), dtype=np.float32)
  q *= 1 / np.sqrt(d)
  c *= 1 / np.sqrt(d)
  ql = rng.integers(0, num_classes, b).astype(np.int32)
  cl = rng.integers(0, num_classes, m).astype(np.int32)
  return q, ql, c, cl


def part1(reps):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgjax import losses  # pylint: disable=g-import-not-at-top

  b, m, d, sigma = 256, 6000, 512, 0.5
  q, ql, c, cl = _data(b, m, d, 200)
  qj, cj = jnp.asarray(q), jnp.asarray(c)
  out = {"B": b, "M": m, "d": d}

  fg = jax.jit(jax.value_and_grad(
      lambda q, c: losses.nca_loss(q, ql, c, cl, sigma).mean(), argnums=(0, 1)))

  def plain(q, c):
    a = -losses.squared_distances(q, c) / (2 * sigma**2)
    pos = cl[None, :] == ql[:, None]
    return jnp.mean(jax.nn.logsumexp(a, axis=1) - jax.nn.logsumexp(
        jnp.where(pos, a, -jnp.inf), axis=1))
  pl = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))

  dm = jnp.asarray(np.random.default_rng(1).normal(size=(b, m)).astype(np.float32))
  roof = jax.jit(lambda q, c, dm: (q @ c.T, dm @ c, dm.T @ q))
  out["roofline_gflop"] = 3 * 2 * b * m * d / 1e9
  fns = {"fgjax_s": lambda: jax.block_until_ready(fg(qj, cj)),
         "plain_jit_s": lambda: jax.block_until_ready(pl(qj, cj)),
         "roofline_s": lambda: jax.block_until_ready(roof(qj, cj, dm))}

  try:
    import torch  # pylint: disable=g-import-not-at-top
    from pytorch_metric_learning import distances as pml_d  # pylint: disable=g-import-not-at-top
    from pytorch_metric_learning import losses as pml_l  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    out["pml_error"] = str(e)
    out.update(_timeit_interleaved(fns, reps))
    return out
  torch.set_num_threads(2)
  pml = pml_l.NCALoss(softmax_scale=1 / (2 * sigma**2),
                      distance=pml_d.LpDistance(power=2, normalize_embeddings=False))
  qt = torch.tensor(q, requires_grad=True)
  ct = torch.tensor(c, requires_grad=True)
  qlt, clt = torch.tensor(ql, dtype=torch.long), torch.tensor(cl, dtype=torch.long)

  def run_pml():
    qt.grad = ct.grad = None
    loss = pml(qt, qlt, ref_emb=ct, ref_labels=clt)
    loss.backward()
    return loss.item()

  fns["pml_s"] = run_pml
  out.update(_timeit_interleaved(fns, reps))
  # Same numbers (every query has a positive here, so the means agree).
  val, _ = fg(qj, cj)
  out["value_fgjax"], out["value_pml"] = float(val), run_pml()
  out["torch_threads"] = torch.get_num_threads()
  return out


def _vm_hwm_mib():
  """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not
  inherited from the forking parent)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part2(m, d, chunk, reps):
  """One chunked configuration; run in a fresh process for a clean ru_maxrss."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgjax import losses  # pylint: disable=g-import-not-at-top

  b, sigma = 256, 0.5
  q, ql, c, cl = _data(b, m, d, 1000)
  qj, cj = jnp.asarray(q), jnp.asarray(c)
  del c
  rss_inputs = _vm_hwm_mib()
  qlj, clj = jnp.asarray(ql), jnp.asarray(cl)
  # Labels are arguments, not closure constants: XLA would fold (M,) constants.
  fn = jax.jit(jax.value_and_grad(
      lambda q, ql, c, cl: losses.nca_loss(q, ql, c, cl, sigma,
                                           chunk_size=chunk or None).mean(),
      argnums=(0, 2)))
  # XLA's own account of the scratch buffers the compiled step needs.
  mem = fn.lower(qj, qlj, cj, clj).compile().memory_analysis()
  temp_mib = getattr(mem, "temp_size_in_bytes", -2**20) / 2**20
  best, med = _timeit(lambda: jax.block_until_ready(fn(qj, qlj, cj, clj)), reps,
                      warmup=1)
  rss = _vm_hwm_mib()
  return {"B": b, "M": m, "d": d, "chunk_size": chunk, "best_s": best,
          "median_s": med, "peak_rss_mib": rss, "rss_after_inputs_mib": rss_inputs,
          "xla_temp_mib": temp_mib,
          "bm_matrix_mib": b * m * 4 / 2**20, "centers_mib": m * d * 4 / 2**20}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--part2", default="", help="internal: m,d,chunk,reps")
  parser.add_argument("--skip_large", action="store_true")
  args = parser.parse_args()
  if args.part2:
    m, d, chunk, reps = map(int, args.part2.split(","))
    print(json.dumps(part2(m, d, chunk, reps)))
    return

  print("uptime:", os.popen("uptime").read().strip())
  r = part1(args.reps)
  r["fgjax_vs_pml"] = r["pml_s"][0] / r["fgjax_s"][0] if "pml_s" in r else None
  r["fgjax_vs_roofline"] = r["fgjax_s"][0] / r["roofline_s"][0]
  r["plain_vs_pml"] = r["pml_s"][0] / r["plain_jit_s"][0] if "pml_s" in r else None
  print(json.dumps(r, indent=1))
  if args.skip_large:
    return
  configs = [(100_000, 512, 8192, 3), (100_000, 512, 0, 3),
             (1_000_000, 128, 8192, 2)]
  for m, d, chunk, reps in configs:
    print("uptime:", os.popen("uptime").read().strip())
    res = subprocess.run(
        [sys.executable, __file__, "--part2", f"{m},{d},{chunk},{reps}"],
        capture_output=True, text=True, check=False)
    print(res.stdout.strip() or res.stderr[-2000:])


if __name__ == "__main__":
  main()
