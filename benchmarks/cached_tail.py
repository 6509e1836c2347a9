"""What deeper fine-tuning costs a step on CPU: head-only and `last:N` on cached backbone
outputs against `last:N` on images (EfficientNet-Lite0, 224 px, batch 32).

  python benchmarks/cached_tail.py [--dataset=cars196 --rounds=5 --steps=5]

Each row is a `fgjax.train.Run` of `configs/common.folder_schemes` (scheme 'ce') with
`config.model.trainable` and `config.train.cache_features` set; its jitted update step
runs on random inputs of the shapes it trains on (cached outputs or images: the time of
a step does not depend on their values). The rows are timed in turns, `--rounds`
times `--steps` steps each, so the shared machine's noise falls on all of them alike;
the median over rounds is reported, with the implied minutes of a 30-epoch run. The
one-off cost of a cached row, the trunk forward that fills the cache, is timed per
image the same way.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "cars196", ["cars196", "birds525"], "Data set.")
_ROWS = flags.DEFINE_list("rows", ["head", "last:1", "last:2", "last:6", "images:last:2"],
                          "Depths; 'images:' trains on augmented images, not the cache.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Turns over the rows.")
_STEPS = flags.DEFINE_integer("steps", 5, "Update steps per turn.")


def _run(row: str):
  from fgjax import train  # pylint: disable=g-import-not-at-top
  c = common.folder_schemes(_DATASET.value, "ce", learning_rate=1e-3)
  c.train.cache_features = not row.startswith("images:")
  c.model.trainable = row.split(":", 1)[1] if row.startswith("images:") else row
  c.data.unknown_root = ""
  return train.Run(c)


def _batch(run, rng):
  bs = run.config.train.batch_size
  meta = {"label": rng.integers(0, run.num_classes, bs).astype(np.int32),
          "index": np.arange(bs, dtype=np.int32), "valid": np.ones(bs, bool)}
  size = run.config.input.image_size
  if not run.outputs.cache_features:
    return {"image": rng.normal(size=(bs, size, size, 3)).astype(np.float32), **meta}
  spec = run.network.spec
  shapes = jax.eval_shape(lambda x: spec.module.apply(spec.variables, x, train=False),
                          jax.ShapeDtypeStruct((bs, size, size, 3), np.float32))
  return {"backbone": {r: rng.normal(size=shapes[r].shape).astype(np.float32)
                       for r in run.network.reads}, **meta}


def main(argv):
  del argv
  from fgjax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = {}
  for row in _ROWS.value:
    run = _run(row)
    state = run.initial_state()
    update = run.make_update()
    batch = parallel.global_batch(_batch(run, rng), run.mesh)
    state, _ = update(state, batch)  # compile
    jax.block_until_ready(state)
    size = run.config.input.image_size
    images = rng.normal(size=(run.config.train.batch_size, size, size, 3)).astype(np.float32)
    reads = run.network.reads
    module, variables = run.network.module, run.initial_variables()
    trunk = jax.jit(lambda v, x: {k: module.apply(v, x, method="trunk")[k] for k in reads})
    jax.block_until_ready(trunk(variables, images))
    rows[row] = {"run": run, "state": state, "update": update, "batch": batch,
                 "trunk": (trunk, variables, images), "step_s": [], "trunk_s": []}
  for _ in range(_ROUNDS.value):
    for r in rows.values():
      t = time.perf_counter()
      for _ in range(_STEPS.value):
        r["state"], _ = r["update"](r["state"], r["batch"])
      jax.block_until_ready(r["state"])
      r["step_s"].append((time.perf_counter() - t) / _STEPS.value)
      if r["run"].outputs.cache_features:
        trunk, variables, images = r["trunk"]
        t = time.perf_counter()
        jax.block_until_ready(trunk(variables, images))
        r["trunk_s"].append((time.perf_counter() - t) / len(images))
  print(f"{_DATASET.value}, efficientnet_lite0, 224 px, batch 32, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {_ROUNDS.value} rounds "
        f"x {_STEPS.value} steps\n")
  print("| trainable | trains on | cached output | ms / step (median, min-max) | "
        "30 epochs, min | cache fill, ms / image |")
  print("|---|---|---|---|---|---|")
  for row, r in rows.items():
    run, s = r["run"], np.array(r["step_s"]) * 1e3
    cached = run.outputs.cache_features
    minutes = np.median(s) / 1e3 * 30 * run.steps_per_epoch / 60
    fill = f"{np.median(r['trunk_s']) * 1e3:.1f}" if cached else "-"
    print(f"| {run.config.model.trainable} | {'cache' if cached else 'images'} | "
          f"{', '.join(run.network.reads) if cached else '-'} | {np.median(s):.0f} "
          f"({s.min():.0f}-{s.max():.0f}) | {minutes:.1f} | {fill} |")


if __name__ == "__main__":
  app.run(main)
