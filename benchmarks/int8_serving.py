"""int8 CPU serving (issue 20): speed of the engines, and accuracy fp32 vs int8.

Run (the speed part wants an otherwise idle machine; it interleaves the engines):
  /work/venv-ref/bin/python benchmarks/int8_serving.py speed --out=speed.json
  python benchmarks/int8_serving.py accuracy --out=accuracy.json WORKDIR [WORKDIR ...]

speed: EfficientNet-Lite0 with its ImageNet head at 224 px, batch 1 and 32, 2 threads,
one process, engines timed in alternating blocks (benchmarks/inference.py's
timeit_blocks):
fgjax engine='onnx' (fp32), fgjax engine='onnx-int8' (calibrated on 64 cars196
training images), ONNX Runtime fp32 on torch.onnx.export's graph (needs torch and
efficientnet-lite-pytorch), OpenVINO fp32 / bf16 on fgjax's fp32 graph and OpenVINO on
fgjax's int8 graph (needs openvino). Rows whose package is missing are left out, and
the output says so. Also: each engine's largest logit error against fgjax fp32, top-1
agreement with it on the calibration-free images, and the size of each graph.

accuracy: for each finished workdir (its artifact), test top-1 of the fp32 ONNX engine
and of the int8 engine (and of OpenVINO running the same int8 graph, when installed)
at the artifact's sigma, int8 with sigma chosen again on val
from the run's grid (RBF networks), top-1 agreement, binomial standard errors, and
the artifact's bytes (fp32 weights, int8 graph, impostors float / as 16-byte PQ).
"""

import argparse
import glob
import importlib.util
import json
import os
import platform
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.inference import timeit_blocks, torch_model  # noqa: E402
from fgjax import artifact  # noqa: E402
from fgjax import data  # noqa: E402
from fgjax import evaluate_run  # noqa: E402
from fgjax import export  # noqa: E402
from fgjax import impostors as impostors_lib  # noqa: E402
from fgjax import models  # noqa: E402
from fgjax import quantize  # noqa: E402
from fgjax import stats  # noqa: E402
from fgjax.data import transforms  # noqa: E402
from fgjax.export import int8 as int8_lib  # noqa: E402
from fgjax.export import onnx as onnx_lib  # noqa: E402

CARS196 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cars196")


def _folder_images(split: str, count: int, spec) -> np.ndarray:
  """`count` cars196 images of `split`, evenly spread, eval-transformed, normalised."""
  files = sorted(glob.glob(os.path.join(CARS196, split, "*", "*.jpg")))
  picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, count).round()]
  images = np.stack([transforms.eval_transform(transforms.decode_image(f, min_size=256),
                                               image_size=224, resize_size=256)
                     for f in picked])
  return transforms.normalize(images, spec.mean, spec.std)


def speed(args) -> dict:
  spec = models.get("efficientnet_lite0", pretrained=True, include_top=True)
  calibration = export.calibrate_int8(spec, images=_folder_images("train", 64, spec),
                                      outputs=("logits",))
  out = {"missing": [], "rows": []}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(2)
    net = torch_model("efficientnet_lite0")
  except ImportError as e:
    net = None
    out["missing"].append(f"ONNX Runtime on torch's export: {e}")
  try:
    import openvino  # pylint: disable=g-import-not-at-top
    core = openvino.Core()
  except ImportError as e:
    core = None
    out["missing"].append(f"OpenVINO: {e}")
  folded, variables = export.fold(spec.module, spec.variables, spec.bn_epsilon, "lax")
  for bs in (1, 32):
    x = _folder_images("test", bs, spec)
    fns, sizes = {}, {}
    fns["fgjax onnx fp32"] = export.make_cpu_predictor(
        spec, batch_size=bs, outputs=("logits",), engine="onnx", image_size=224)
    fns["fgjax onnx-int8"] = export.make_cpu_predictor(
        spec, batch_size=bs, outputs=("logits",), engine="onnx-int8", image_size=224,
        int8_calibration=calibration)
    fp32 = onnx_lib.to_onnx(folded, variables, (bs, 224, 224, 3), ("logits",))
    qdq = int8_lib.quantize(fp32, calibration)
    sizes = {"fgjax onnx fp32": fp32.ByteSize(), "fgjax onnx-int8": qdq.ByteSize()}
    if net is not None:
      with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        torch.onnx.export(net, (xt,), path, input_names=["x"], output_names=["y"],
                          dynamo=False)
        import onnx  # pylint: disable=g-import-not-at-top
        sess = onnx_lib.session(onnx.load(path), 2)
      x_nchw = xt.numpy()
      fns["ONNX Runtime fp32 (torch export)"] = (
          lambda _, s=sess, v=x_nchw: {"logits": s.run(None, {"x": v})[0]})
    if core is not None:
      for name, graph, precision in (("fp32 graph, f32", fp32, "f32"),
                                     ("fp32 graph, bf16", fp32, "bf16"),
                                     ("int8 graph", qdq, "f32")):
        with tempfile.TemporaryDirectory() as d:
          path = os.path.join(d, "m.onnx")
          onnx.save(graph, path)
          compiled = core.compile_model(path, "CPU", {
              "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 2,
              "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        fns[f"OpenVINO {name}"] = (
            lambda _, r=request, v=x: {"logits": np.asarray(r.infer({0: v})[0])})
    reference = fns["fgjax onnx fp32"](x)["logits"]
    errors = {}
    for k, fn in fns.items():
      got = fn(x)["logits"]
      errors[k] = (float(np.abs(got - reference).max()),
                   float((got.argmax(1) == reference.argmax(1)).mean()))
    # Blocks, not call-by-call interleaving: OpenVINO's and PyTorch's worker threads
    # keep spinning after a call returns and would slow whichever engine runs next.
    times = timeit_blocks({k: (lambda f=f: f(x)) for k, f in fns.items()},
                          args.repeats * (8 if bs == 1 else 1), blocks=3)
    for k, t in times.items():
      row = {"batch": bs, "engine": k, "ms_per_batch": t * 1e3,
             "ms_per_image": t * 1e3 / bs, "max_abs_logit_err_vs_fgjax_fp32":
             errors[k][0], "top1_agreement_vs_fgjax_fp32": errors[k][1],
             "graph_bytes": sizes.get(k)}
      out["rows"].append(row)
      print(json.dumps(row), flush=True)
  return out


def _split_outputs(model: artifact.Model, source, keys) -> dict[str, np.ndarray]:
  size, resize = model.meta["image_size"], model.meta["resize_size"]
  outs: dict[str, list] = {}
  labels = []
  for start in range(0, len(source), 64):
    recs = [source[i] for i in range(start, min(start + 64, len(source)))]
    images = np.stack([transforms.eval_transform(r["image"], image_size=size,
                                                 resize_size=resize) for r in recs])
    got = model.forward(transforms.normalize(images, model.mean, model.std))
    for k in keys:
      outs.setdefault(k, []).append(np.asarray(got[k]))
    labels += [int(r["label"]) for r in recs]
  return {**{k: np.concatenate(v) for k, v in outs.items()},
          "label": np.asarray(labels, np.int32)}


def accuracy(args) -> dict:
  out = {"runs": []}
  for workdir in args.workdirs:
    path = os.path.join(workdir, "artifact")
    config = ml_collections.ConfigDict(
        json.load(open(os.path.join(path, "config.json"))))
    splits = data.get_splits(config.data)
    keys = artifact.served_outputs(os.path.exists(os.path.join(path, "impostors.npz")))
    row = {"workdir": workdir, "scheme": config.scheme, "source": config.data.source}
    preds = {}
    engines = [("onnx", "fp32"), ("onnx-int8", "fp32")]
    if importlib.util.find_spec("openvino"):
      engines.append(("openvino", "int8"))
    for engine, precision in engines:
      model = artifact.Model(path, engine=engine, batch_size=args.batch_size,
                             precision=precision)
      if precision != "fp32":
        engine = f"{engine}-{precision}"
      outputs = {s: _split_outputs(model, getattr(splits, s), keys)
                 for s in ("val", "test")}
      num_classes = len(model.class_names)
      if model.impostors is not None:
        test = outputs["test"]
        log_probs = impostors_lib.rbf_log_probs(test["embedding"], model.impostors,
                                                model.sigma, num_classes=num_classes)
        preds[engine] = np.asarray(log_probs).argmax(1)
        rechosen = evaluate_run.evaluate_splits(
            outputs, impostors=model.impostors, num_classes=num_classes,
            eval_config=config.eval, default_sigma=model.sigma)
        row[f"{engine}_sigma_rechosen"] = rechosen["sigma"]
        row[f"{engine}_test_top1_sigma_rechosen"] = (
            rechosen["splits"]["test"]["rbf"]["top1"])
      else:
        preds[engine] = outputs["test"]["logits"].argmax(1)
      labels = outputs["test"]["label"]
      top1 = float((preds[engine] == labels).mean())
      row[f"{engine}_test_top1"] = top1
      row[f"{engine}_test_top1_se"] = stats.binomial_se(top1, len(labels))
    row["sigma"] = model.sigma
    row["test_images"] = int(len(labels))
    row["top1_agreement"] = float((preds["onnx"] == preds["onnx-int8"]).mean())
    if "openvino-int8" in preds:
      row["top1_agreement_openvino_int8_vs_onnx_int8"] = float(
          (preds["openvino-int8"] == preds["onnx-int8"]).mean())
    # Images one engine gets right and the other wrong (the pairs a McNemar test uses).
    right = {e: preds[e] == labels for e in preds}
    row["only_fp32_right"] = int((right["onnx"] & ~right["onnx-int8"]).sum())
    row["only_int8_right"] = int((right["onnx-int8"] & ~right["onnx"]).sum())
    row["bytes"] = _artifact_bytes(path, model)
    out["runs"].append(row)
    print(json.dumps(row), flush=True)
  return out


def _artifact_bytes(path: str, model: artifact.Model) -> dict:
  sizes = {"variables_fp32": os.path.getsize(os.path.join(path, "variables.msgpack"))}
  folded, variables = export.fold(model.network.module, model.variables,
                                  model.network.spec.bn_epsilon, "lax")
  keys = artifact.served_outputs(model.impostors is not None)
  size = model.meta["image_size"]
  fp32 = onnx_lib.to_onnx(folded, variables, (1, size, size, 3), keys)
  sizes["onnx_fp32_graph"] = fp32.ByteSize()
  sizes["onnx_int8_graph"] = int8_lib.quantize(
      fp32, model._int8(path)["calibration"]).ByteSize()
  if model.impostors is not None and model.impostors.centers is not None:
    centers = np.asarray(model.impostors.centers)
    sizes["impostors_float32"] = int(centers.nbytes)
    pq = quantize.train_pq(centers, 16, seed=0)
    pq_bytes = quantize.nbytes(pq, quantize.encode(pq, centers))
    # The paper's 92 KB counts the 16-byte codes only; the codebooks come on top.
    sizes["impostors_pq16_codes"] = pq_bytes["codes"]
    sizes["impostors_pq16_total"] = pq_bytes["total"]
  return sizes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("part", choices=("speed", "accuracy"))
  parser.add_argument("workdirs", nargs="*")
  parser.add_argument("--out", required=True)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_intermixed_args()
  result = speed(args) if args.part == "speed" else accuracy(args)
  result["machine"] = f"{platform.node()} {os.cpu_count()} CPUs"
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
