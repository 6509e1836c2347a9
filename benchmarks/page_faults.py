"""Page faults and kernel time per fgjax training step, with and without retained memory.

  python benchmarks/page_faults.py --model squeezenet1_1 [--retain-freed-memory]

Runs the SGD step of benchmarks/inference.py (`make_train_step`: batch 32, 224 px, BN in
train mode) and prints, per step, wall seconds, minor page faults and system CPU seconds (getrusage).
See fgjax/host_memory.py for why the faults happen.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Imported first: its top applies --retain-freed-memory (and JAX_PLATFORMS=cpu) before
# jax starts any thread.
import inference as inference_benchmark  # noqa: E402  (benchmarks/inference.py)

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fgjax import models  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="squeezenet1_1")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--retain-freed-memory", action="store_true")
  args = parser.parse_args()
  spec = models.get(args.model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 224, 224, 3)), jnp.float32)

  step = inference_benchmark.make_train_step(spec)

  variables = spec.variables
  rows = []
  for i in range(args.steps + 1):  # step 0 compiles
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    variables, l = step(variables, x)
    l.block_until_ready()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if i:
      rows.append((t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
      print(f"step {i}: {t1 - t0:.3f} s, {rows[-1][1]} minor faults, "
            f"{rows[-1][2]:.3f} s system", flush=True)
  wall, faults, system = np.median(np.array(rows), axis=0)
  print(f"# {args.model} retain_freed_memory={args.retain_freed_memory}: median "
        f"{wall:.3f} s/step, {faults:.0f} faults/step, {system:.3f} s system/step")


if __name__ == "__main__":
  main()
