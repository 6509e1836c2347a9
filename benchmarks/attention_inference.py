"""CPU ms per image of every BAP / Coarse2Fine inference mode next to the plain network
(issue 15): what the attention maps, WS-DAN's test crop and Coarse2Fine's second
backbone pass cost.

EfficientNet-Lite0 (its ImageNet weights; speed does not depend on them) at 224 px,
196 classes, served by `fgjax.export.make_cpu_predictor` (BN folded, jitted, XLA:CPU on
the VM's 2 threads; with --onnx also ONNX Runtime, where the engine serves the network)
at batch 1 and 32. The networks of one batch size and engine are timed interleaved,
call by call, so they share the machine's background load and their ratios are
meaningful.

  gap          the plain ConvNet ('logits'): one backbone pass.
  bap          32 attention maps + BAP + softmax head: one backbone pass.
  bap_crop     WS-DAN eval: the raw prediction averaged with that of the crop at 0.1 of
               the mean attention map: two backbone passes.
  c2f_coarse   Coarse2Fine, coarse head only (the fine pass is not computed).
  c2f_fine     Coarse2Fine, fine head: the backbone again on the masked image.
  c2f_average  the mean of both predicted distributions (the paper's best).

  python benchmarks/attention_inference.py [--onnx] [--json=FILE]
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from benchmarks import inference  # noqa: E402
from configs import common  # noqa: E402
from fgjax import export  # noqa: E402
from fgjax.models import nets  # noqa: E402

NETWORKS = {
    "gap": {"net": "convnet"},
    "bap": {"net": "bap", "attention_maps": 32},
    "bap_crop": {"net": "bap", "attention_maps": 32, "attention_crop_drop": True},
    "c2f_coarse": {"net": "c2f", "attention_maps": 8, "c2f_mode": "coarse"},
    "c2f_fine": {"net": "c2f", "attention_maps": 8, "c2f_mode": "fine"},
    "c2f_average": {"net": "c2f", "attention_maps": 8, "c2f_mode": "average"},
}


def predictor(name: str, batch: int, engine: str, size: int):
  """predict(images) of network `name`, or the engine's refusal as a string."""
  c = common.folder_schemes("cars196", "ce", 1e-3).model
  c.update(NETWORKS[name])
  network = nets.build(c, 196)
  variables = network.init(0, size)
  try:
    return export.make_cpu_predictor(network.module, variables, batch,
                                     outputs=("logits",),
                                     bn_epsilon=network.spec.bn_epsilon, engine=engine,
                                     image_size=size)
  except (ValueError, NotImplementedError) as e:
    return f"refused: {str(e)[:160]}"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--onnx", action="store_true")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  engines = ["xla"] + (["onnx"] if args.onnx else [])
  rows = []
  for batch in map(int, args.batches.split(",")):
    x = np.random.default_rng(0).normal(size=(batch, args.size, args.size, 3)).astype(
        np.float32)
    times, refused = {}, {}
    for engine in engines:
      fns = {}
      for name in NETWORKS:
        fn = predictor(name, batch, engine, args.size)
        if isinstance(fn, str):
          refused[(engine, name)] = fn
        else:
          fns[(engine, name)] = (lambda f: lambda: f(x))(fn)
      # One engine at a time: ONNX Runtime's threads spin on after a call and slowed
      # the XLA call after them (xla gap at batch 1: 19.7 ms interleaved with ONNX,
      # against c2f_coarse's 11.0).
      times.update(inference.timeit_interleaved(fns, args.repeats))
    for engine in engines:
      base = times.get((engine, "gap"))
      for name in NETWORKS:
        row = {"batch": batch, "engine": engine, "network": name}
        if (engine, name) in times:
          ms = 1e3 * times[(engine, name)] / batch
          row.update(ms_per_image=ms, vs_gap=ms / (1e3 * base / batch) if base else None)
        else:
          row["refused"] = refused[(engine, name)]
        rows.append(row)
        print(json.dumps(row), flush=True)
  meta = {"machine": platform.node(), "cpus": os.cpu_count(),
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": args.size}
  print("| batch | engine | network | ms / image | x gap |\n|---|---|---|---|---|")
  for r in rows:
    cell = (f"{r['ms_per_image']:.1f} | {r['vs_gap']:.2f}" if "ms_per_image" in r
            else f"{r['refused'][:60]} | -")
    print(f"| {r['batch']} | {r['engine']} | {r['network']} | {cell} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
