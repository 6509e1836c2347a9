"""Train-iterator throughput (images/s) on birds525 at 224 px, worker_count 0 and 2.

Run (serialised with other benchmarks):
  flock /tmp/fgjax-bench.lock /work/venv/bin/python benchmarks/data_pipeline.py
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax import data  # noqa: E402  pylint: disable=g-import-not-at-top


def measure(source, worker_count: int, batch_size: int = 32, warmup: int = 2,
            steps: int = 30) -> float:
  it = data.make_iterator(source, batch_size=batch_size, train=True, seed=0,
                          image_size=224, resize_size=256, mean=(127.5,) * 3,
                          std=(127.5,) * 3, worker_count=worker_count,
                          process_index=0, process_count=1)
  for _ in range(warmup):  # Worker start-up is not throughput.
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch_size / (time.perf_counter() - start)


def main():
  cfg = {"source": "birds525", "root": "", "split": "canonical", "seed": 0}
  t = time.perf_counter()
  splits = data.get_splits(cfg)
  print(f"get_splits (scan + validate 2,625 files): {time.perf_counter() - t:.2f} s")
  print(f"load average before: {os.getloadavg()}")
  for workers in (0, 2):
    rate = measure(splits.train, workers)
    print(f"worker_count={workers}: {rate:.0f} images/s (batch 32, 224 px, resize 256, "
          f"random crop + flip, normalise); load average {os.getloadavg()}")


if __name__ == "__main__":
  main()
