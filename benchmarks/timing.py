"""Per-image CPU time: ConvNet forward vs the RBF classifier (paper section 4.1, Fig. 3).

For EfficientNet-Lite0 and SqueezeNet 1.1 (fgjax's CPU inference path,
`fgjax.export.make_cpu_predictor`, engine 'xla') at batch 1 and 32, and for the RBF rule
(eq. 3) over M = 1.5k, 6k, 100k, 1M impostors (d = 512, synthetic clustered impostors)
through three classifiers:
  exact  - all M impostors, jitted (fgjax.impostors.rbf_log_probs, chunked over M);
  scann  - k = 64 nearest impostors from a ScaNN index (fgjax.search), then eq. (3);
  pq-adc - 16-byte OPQ codes, asymmetric distance tables, eq. (3) on all M codes.
Also ScaNN's queries/s at 1M on one core and its top-1 agreement with exact.

  PYTHONPATH=. python benchmarks/timing.py [--sizes=1500,6000,100000,1000000]
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

_SIZES = flags.DEFINE_list("sizes", ["1500", "6000", "100000", "1000000"], "Impostor counts M.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension d_em.")
_CLASSES = flags.DEFINE_integer("classes", 200, "Number of classes of the impostors.")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Queries for the ScaNN agreement test.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")


def _median_time(fn, reps):
  fn()  # Warm-up / compile.
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def forward_times(reps):
  from fgjax import export
  from fgjax import models
  rows = {}
  for name in ("efficientnet_lite0", "squeezenet1_1"):
    spec = models.get(name, pretrained=False)
    for batch in (1, 32):
      predict = export.make_cpu_predictor(spec, batch_size=batch, outputs=("pooled",),
                                          image_size=spec.input_size)
      x = np.random.default_rng(0).normal(
          size=(batch, spec.input_size, spec.input_size, 3)).astype(np.float32)
      rows[(name, batch)] = _median_time(lambda: predict(x), reps) / batch
  return rows


def synthetic_impostors(m, d, classes, seed=0):
  """Clustered unit-scale impostors: class means plus noise, as after protocol step 3."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(classes, d)).astype(np.float32) / np.sqrt(d)
  labels = rng.integers(0, classes, size=m).astype(np.int32)
  centers = means[labels] + 0.5 * rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
  return centers, labels, means


def classifier_times(m, reps):
  from fgjax import impostors, quantize, search
  d, c = _DIM.value, _CLASSES.value
  centers, labels, means = synthetic_impostors(m, d, c)
  sigma = 0.2
  imps = impostors.ImpostorSet(jnp.asarray(centers), jnp.asarray(labels))
  chunk = None if m <= 100_000 else 65_536
  # Impostors are arguments, not closed-over constants: at M = 1M a constant would be
  # copied into the executable (2 GB), which ran this 24 GB machine out of memory.
  exact_fn = jax.jit(lambda q, s: impostors.rbf_log_probs(q, s, sigma, num_classes=c,
                                                         chunk_size=chunk))
  exact = lambda q: exact_fn(q, imps)
  rng = np.random.default_rng(1)
  rows = {}
  t0 = time.perf_counter()
  # One search thread: the paper's setting and the queries/s target are per thread.
  index = search.build_index(centers, backend="scann", num_threads=1)
  build_scann = time.perf_counter() - t0
  scann_rule = search.NeighborClassifier(index, labels, sigma, c, k=64)
  t0 = time.perf_counter()
  sample = centers[rng.choice(m, size=min(m, 50_000), replace=False)]
  pq = quantize.train_opq(sample, 16, opq_iterations=5, iterations=10)
  codes = jnp.concatenate([quantize.encode(pq, centers[i:i + 100_000])
                           for i in range(0, m, 100_000)])
  build_pq = time.perf_counter() - t0
  adc_fn = jax.jit(lambda q, pq, codes, labels: quantize.rbf_log_probs_from_sq_distances(
      quantize.adc_squared_distances(pq, q, codes), labels, sigma, c))
  adc = lambda q: adc_fn(q, pq, codes, imps.labels)
  for batch in (1, 32):
    q = jnp.asarray(means[rng.integers(0, c, batch)] +
                    0.5 * rng.normal(size=(batch, d)).astype(np.float32) / np.sqrt(d))
    qn = np.asarray(q)
    rows[("exact", batch)] = _median_time(lambda: exact(q).block_until_ready(), reps) / batch

    def via_scann():  # The serving path: ScaNN search + eq. (3) over 64 neighbours.
      return np.asarray(scann_rule(qn))
    rows[("scann", batch)] = _median_time(via_scann, reps) / batch
    rows[("pq-adc", batch)] = _median_time(lambda: adc(q).block_until_ready(), reps) / batch
  # ScaNN throughput and agreement with the exact rule on many queries.
  nq = _QUERIES.value
  qs = (means[rng.integers(0, c, nq)] +
        0.5 * rng.normal(size=(nq, d)).astype(np.float32) / np.sqrt(d)).astype(np.float32)
  t = time.perf_counter()
  dist, idx = index.search(qs, 64)
  qps = nq / (time.perf_counter() - t)
  lp_scann = np.asarray(impostors.rbf_log_probs_from_neighbors(
      jnp.asarray(dist), jnp.asarray(idx), imps.labels, sigma, c))
  lp_exact = np.concatenate([np.asarray(exact(jnp.asarray(qs[i:i + 32])))
                             for i in range(0, nq, 32)])
  agree = float(np.mean(lp_scann.argmax(1) == lp_exact.argmax(1)))
  return rows, {"scann_qps": qps, "scann_top1_agreement": agree,
                "scann_build_s": build_scann, "pq_build_s": build_pq}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(f"jax {jax.__version__}, devices {jax.devices()}, cpus {os.sched_getaffinity(0)}")
  fwd = forward_times(_REPS.value)
  print("\n| backbone | batch | forward ms / image |\n|---|---|---|")
  for (name, batch), t in fwd.items():
    print(f"| {name} | {batch} | {t * 1e3:.2f} |")
  lite = {b: fwd[("efficientnet_lite0", b)] for b in (1, 32)}
  print("\n| M | batch | exact ms/img | scann ms/img | pq-adc ms/img | "
        "exact / Lite0 fwd | scann / Lite0 fwd |")
  print("|---|---|---|---|---|---|---|")
  extra = {}
  for m in (int(s) for s in _SIZES.value):
    rows, extra[m] = classifier_times(m, _REPS.value)
    for batch in (1, 32):
      e, s, p = (rows[(k, batch)] for k in ("exact", "scann", "pq-adc"))
      print(f"| {m} | {batch} | {e * 1e3:.3f} | {s * 1e3:.3f} | {p * 1e3:.3f} | "
            f"{100 * e / lite[batch]:.1f}% | {100 * s / lite[batch]:.1f}% |", flush=True)
  print("\n| M | ScaNN queries/s (1 thread, k=64) | top-1 agreement vs exact | "
        "ScaNN build s | OPQ build s |\n|---|---|---|---|---|")
  for m, e in extra.items():
    print(f"| {m} | {e['scann_qps']:.0f} | {e['scann_top1_agreement']:.4f} | "
          f"{e['scann_build_s']:.1f} | {e['pq_build_s']:.1f} |")


if __name__ == "__main__":
  app.run(main)
