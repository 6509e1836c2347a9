"""What ELoPE's localization module costs next to the classifier (ELoPE Table 3).

  python benchmarks/localization_cost.py [--repeats 9] [--backbone efficientnet_lite0]

Per image, on CPU (jax.jit, XLA:CPU, batch 1 and 32, interleaved, median): the ELoPE
network's forward on the image (backbone + k-max + embedding + classifier), the
localization module alone (its 64 x 64 resize, the backbone's first blocks, the heat
map, the box), and the localized network end to end (module, crop, classifier). FLOPs
from XLA's cost analysis of the compiled forward at batch 1 (multiply-adds count 2).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from fgjax.models import localize  # noqa: E402
from fgjax.models import nets  # noqa: E402
from fgjax.models import xla_cpu  # noqa: E402


def build(backbone: str, stop: str, size: int, map_size: int):
  c = common.get_config().model
  c.update(dict(backbone=backbone, pretrained=backbone == "efficientnet_lite0",
                net="elope_localized", pooling="kmax", localizer_stop=stop,
                localizer_map_size=map_size))
  network = nets.build(c, num_classes=196)
  return network, network.init(0, size)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--backbone", default="efficientnet_lite0")
  parser.add_argument("--stop", default="stage2")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--map_size", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--batches", default="1,32", help="Batch sizes to time.")
  args = parser.parse_args()
  network, variables = build(args.backbone, args.stop, args.size, args.map_size)
  module = network.module
  fns = {
      "classifier on the image (ELoPE net)": lambda v, x: module.apply(
          v, x, method=lambda m, x: m.head(m.backbone(x)))["logits"],
      "localization module (box)": lambda v, x: module.apply(
          v, x, method=lambda m, x: localize.heatmap_boxes(m.localize(x), m.tau)),
      "localized network (module + crop + classifier)": lambda v, x: module.apply(
          v, x)["logits"],
  }
  n_loc = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
      {k: variables["params"][k] for k in ("localizer", "localizer_head")}))
  n_all = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  print(f"{args.backbone} at {args.size} px, localizer up to {args.stop} on 64 px: "
        f"{n_loc:,} of {n_all:,} parameters; {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load {os.getloadavg()}")
  compiled = {}
  for batch in (int(b) for b in args.batches.split(",")):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, args.size, args.size, 3)),
                    jnp.float32)
    for name, fn in fns.items():
      c = xla_cpu.jit(fn).lower(variables, x).compile()
      compiled[name, batch] = (c, x)
      if batch == int(args.batches.split(",")[0]):
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        print(f"  FLOPs per image, {name}: "
              f"{cost.get('flops', float('nan')) / batch:.3e}")
    for _ in range(2):
      for name in fns:
        c, x = compiled[name, batch]
        jax.block_until_ready(c(variables, x))
    times = {name: [] for name in fns}
    for _ in range(args.repeats):  # interleaved rounds
      for name in fns:
        c, x = compiled[name, batch]
        t0 = time.perf_counter()
        jax.block_until_ready(c(variables, x))
        times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
      print(f"  batch {batch:2d}, {name}: {1e3 * np.median(t) / batch:.2f} ms / image")


if __name__ == "__main__":
  main()
