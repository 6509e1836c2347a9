"""fgjax's hand-written jaxpr -> ONNX translator vs jax2onnx: what each serves, how fast.

  PYTHONPATH=<dir with jax2onnx> python benchmarks/onnx_exporters.py [--repeats 7]

jax2onnx (PyPI; not an fgjax dependency) is only needed for this comparison; without it
only fgjax's own export is measured. Both exporters get the same function: the network
BN-folded with conv_impl='lax' (fgjax.export.fold), returning the requested outputs.

Serving: every registered network x pooling on EfficientNet-Lite0 (pretrained, K = 4)
at 224 px, batch 1: the export must build, load in onnxruntime and match the jit path
(unfolded) to 1e-4 relative. Speed: onnxruntime (ORT_ENABLE_ALL, 2 intra-op threads)
on each export of Lite0 ('pooled') and of impostor + k-max at batch 1 and 32, 224 px,
engines interleaved call by call in one process (benchmarks/inference.py's
`timeit_interleaved`: median after 2 warm-up calls each).
"""

import importlib
import logging
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
importlib.import_module("inference")  # sets JAX_PLATFORMS=cpu, puts fgjax on the path

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fgjax import export  # noqa: E402
from fgjax.export import onnx as onnx_export  # noqa: E402
from fgjax.models import nets  # noqa: E402
from fgjax.models import pooling  # noqa: E402
from inference import timeit_interleaved  # noqa: E402  (benchmarks/inference.py)

THREADS = 2


def network(net: str, pool: str, k: int = 4) -> nets.Network:
  cfg = ml_collections.ConfigDict(dict(
      backbone="efficientnet_lite0", pretrained=True, weights_path="", net=net,
      pooling=pool, pooling_k=k, embed_dim=128))
  return nets.build(cfg, num_classes=200)


def fgjax_export(module, variables, shape, names):
  return onnx_export.to_onnx(module, variables, shape, names)


def jax2onnx_export(module, variables, shape, names):
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top

  def fn(x):
    out = module.apply(variables, x, train=False)
    return tuple(out[k] for k in names)

  # Default opset (23): at opset 17 jax2onnx 0.17.1 emits ReduceMean with an axes
  # input, which onnxruntime rejects.
  return to_onnx(fn, [jax.ShapeDtypeStruct(shape, jnp.float32)],
                 output_names=list(names))


EXPORTERS = {"fgjax": fgjax_export, "jax2onnx": jax2onnx_export}


def build(exporter, net_obj, variables, bs, names):
  """(ORT session, input name, seconds to export and load) or raises."""
  module, folded = export.fold(net_obj.module, variables, net_obj.spec.bn_epsilon,
                               "lax")
  t0 = time.perf_counter()
  model = EXPORTERS[exporter](module, folded, (bs, 224, 224, 3), names)
  sess = onnx_export.session(model, THREADS)
  return sess, sess.get_inputs()[0].name, time.perf_counter() - t0, model


def serve_table(exporters):
  x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  rows, backbone_out = [], None
  for net in nets.names():
    for pool in pooling.names():
      n = network(net, pool)
      variables = n.init(0, 224)
      names = ("embedding", "logits") if n.has_logits else ("embedding",)
      if backbone_out is None:  # The same pretrained backbone under every network.
        backbone_out = jax.jit(lambda v, x: n.spec.module.apply(v, x, train=False))(
            n.spec.variables, x)
      # The jit path: its backbone outputs, then the network's own layers.
      want = n.head_apply(variables, backbone_out)
      row = [net, pool]
      for exporter in exporters:
        try:
          sess, inp, secs, model = build(exporter, n, variables, 1, names)
          got = sess.run(None, {inp: x})
          err = max(float(np.abs(g - np.asarray(want[k])).max()
                          / np.abs(np.asarray(want[k])).max())
                    for g, k in zip(got, names))
          ok = "yes" if err <= 1e-4 else f"WRONG ({err:.1e})"
          nodes = len(model.graph.node)
          row.append(f"{ok}, {nodes} nodes, {secs:.1f} s")
        except Exception as e:  # pylint: disable=broad-except
          row.append(f"no: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
        print("#", *row, flush=True)
      rows.append(row)
  return rows


def speed_table(exporters, repeats):
  rows = []
  cases = [("Lite0 backbone ('pooled')", "convnet", "avg", ("pooled",)),
           ("impostor + kmax (K=4) ('embedding')", "impostor", "kmax", ("embedding",)),
           ("convnet + avg ('embedding', 'logits')", "convnet", "avg",
            ("embedding", "logits"))]
  for label, net, pool, names in cases:
    n = network(net, pool)
    variables = n.init(0, 224)
    for bs in (1, 32):
      x = np.random.default_rng(0).normal(size=(bs, 224, 224, 3)).astype(np.float32)
      fns = {}
      for exporter in exporters:
        sess, inp, _, _ = build(exporter, n, variables, bs, names)
        fns[exporter] = (lambda s, i: lambda: s.run(None, {i: x}))(sess, inp)
      res = timeit_interleaved(fns, repeats)
      rows.append((label, bs, {k: v * 1e3 for k, v in res.items()}))
      print("#", label, bs, {k: f"{v * 1e3:.1f} ms" for k, v in res.items()},
            flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no-serve", action="store_true", help="speed table only")
  args = parser.parse_args()
  logging.getLogger("jax2onnx").setLevel(logging.ERROR)
  exporters = ["fgjax"]
  try:
    import jax2onnx  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    exporters.append("jax2onnx")
  except ImportError:
    print("# jax2onnx is not importable: measuring fgjax's export only")
  uptime = lambda: subprocess.run(["uptime"], capture_output=True,  # noqa: E731
                                  text=True).stdout.strip()
  print("# uptime:", uptime())
  speed = speed_table(exporters, args.repeats)
  print("# uptime:", uptime())
  serve = [] if args.no_serve else serve_table(exporters)
  if serve:
    print("# uptime:", uptime())
  print("\n| network | batch | " + " | ".join(f"{e} ms / batch" for e in exporters) + " |")
  print("|---|---|" + "---|" * len(exporters))
  for label, bs, ms in speed:
    print(f"| {label} | {bs} | " + " | ".join(f"{ms[e]:.1f}" for e in exporters) + " |")
  print("\n| net | pooling | " + " | ".join(f"{e} serves?" for e in exporters) + " |")
  print("|---|---|" + "---|" * len(exporters))
  for row in serve:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
