"""Test top-1 along training of the birds525 bap + center-loss head, cached against
augmented inputs: how BENCHMARKS 17 found that a constant Adam rate makes the BAP head
fall apart on augmented inputs, and that a cosine decay does not.

The run's config is the `bap_center_aug` row of benchmarks/attention_table.py (head
only, 30 epochs, lr 3e-4, Adam + coupled weight decay 5e-4); every --every steps the
test split is scored through the cached-feature head (exactly the full forward's
logits: the backbone is frozen) and one JSON line is printed with the training CE,
the attention center loss, the fraction of attention cells > 0 and the classifier's
kernel norm:

  python benchmarks/bap_trajectory.py --inputs=augmented --schedule=constant \\
      --steps=600 --feature_cache_dir=/work/runs/fcache
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from fgjax import parallel  # noqa: E402
from fgjax import train  # noqa: E402
from fgjax.data import pipeline  # noqa: E402

_INPUTS = flags.DEFINE_enum("inputs", "augmented", ["cached", "augmented"],
                            "cached: fixed backbone outputs of the centre crop; "
                            "augmented: random crop + flip every step.")
_SCHEDULE = flags.DEFINE_enum("schedule", "constant", ["constant", "cosine"],
                              "config.optim.schedule (cosine over all 30 epochs).")
_STEPS = flags.DEFINE_integer("steps", 1470, "Steps to run (30 epochs: 1470).")
_EVERY = flags.DEFINE_integer("every", 100, "Score the test split every this many steps.")
_CACHE = flags.DEFINE_string("feature_cache_dir", "", "Shared backbone-output cache.")


def main(argv):
  del argv
  c = common.folder_schemes("birds525", "ce", learning_rate=3e-4)
  c.model.net = "bap"
  c.model.attention_maps = 32
  c.loss.terms = "ce,attention_center"
  c.train.num_epochs = 30
  c.optim.schedule = _SCHEDULE.value
  c.data.unknown_root = ""
  c.train.cache_features = True  # the test split is always scored on cached features
  c.train.feature_cache_dir = _CACHE.value
  run = train.Run(c)
  if _INPUTS.value == "augmented":
    run.forward = "frozen_bn"  # the update of an uncached head-only run
    spec = run.network.spec
    batches = pipeline.make_iterator(
        run.splits.train, batch_size=c.train.batch_size, train=True, seed=c.seed,
        image_size=c.input.image_size, resize_size=c.input.resize_size,
        mean=spec.mean, std=spec.std, flip=c.input.flip)
  else:
    batches = run.outputs.train_batches(0)
  update = run.make_update()
  state = run.initial_state()
  start = time.time()
  for step in range(1, _STEPS.value + 1):
    state, metrics = update(state, parallel.global_batch(next(batches), run.mesh))
    if step % _EVERY.value and step != _STEPS.value:
      continue
    variables = state.variables()
    out = run.outputs.outputs(variables, "test", ("logits", "attention"))
    print(json.dumps({
        "inputs": _INPUTS.value, "schedule": _SCHEDULE.value, "step": step,
        "test_top1": round(float(np.mean(out["logits"].argmax(-1) == out["label"])), 4),
        "ce": round(float(metrics["ce_loss"]), 4),
        "center": round(float(metrics["attention_center_loss"]), 4),
        "attention_on": round(float((out["attention"] > 0).mean()), 3),
        "classifier_norm": round(float(jnp.linalg.norm(
            variables["params"]["classifier"]["kernel"])), 2),
        "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
  app.run(main)
