"""CPU inference / train-step speed: fgjax vs PyTorch eager vs ONNX Runtime.

Run (serialised with other engineers' timing runs):
  flock /tmp/fgjax-bench.lock /work/venv/bin/python benchmarks/inference.py

Models: EfficientNet-Lite0 and SqueezeNet 1.1 at 224x224, batch 1 and 32, 2 threads.
The VM has 2 cores, so XLA:CPU also uses 2 threads.

--retain-freed-memory applies fgjax.host_memory.retain_freed_memory() (glibc malloc
keeps freed large blocks) before anything else starts, as launch.py does. It is
process-wide, so it applies to every engine in the run alike.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if "--retain-freed-memory" in sys.argv:  # before any thread allocates
  from fgjax import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top
  if not host_memory.retain_freed_memory():
    raise SystemExit("--retain-freed-memory: this C library is not glibc.")

import argparse  # noqa: E402
import copy  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fgjax import export  # noqa: E402
from fgjax import models  # noqa: E402
from fgjax.models import xla_cpu  # noqa: E402


def timeit(fn, repeats: int, min_time: float = 1.0) -> float:
  """Median seconds per call after 2 warm-up calls."""
  return timeit_interleaved({"f": fn}, repeats, min_time)["f"]


def timeit_interleaved(fns: dict, repeats: int, min_time: float = 1.0) -> dict:
  """Median seconds per call of each engine, timed round-robin after 2 warm-ups each.

  Interleaving makes the engines share the same background load (the VM is shared), so
  their ratios are meaningful even when the absolute numbers drift.
  """
  for fn in fns.values():
    fn()
    fn()
  times = {k: [] for k in fns}
  start = time.perf_counter()
  rounds = 0
  while rounds < repeats or time.perf_counter() - start < min_time * len(fns):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
    rounds += 1
    if rounds >= 200:
      break
  return {k: float(np.median(v)) for k, v in times.items()}


def timeit_blocks(fns: dict, repeats: int, blocks: int = 2) -> dict:
  """Median seconds per call, each engine timed in its own consecutive block.

  Blocks alternate between engines (A B A B), each block starting with one untimed
  call. For the train step this beats interleaving call by call: PyTorch's OpenMP
  workers keep spinning after a call returns and slow whatever runs next on the 2
  cores (measured: fgjax's step 2.1 s alone, 2.5 s right after PyTorch steps, and 2.1 s
  with OMP_WAIT_POLICY=PASSIVE).
  """
  times = {k: [] for k in fns}
  for _ in range(blocks):
    for k, fn in fns.items():
      fn()
      for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def torch_model(name: str):
  import torch  # pylint: disable=g-import-not-at-top
  if name == "efficientnet_lite0":
    import efficientnet_lite_pytorch  # pylint: disable=g-import-not-at-top
    from fgjax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
    net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(efficientnet_lite.default_weights_path(),
                                   map_location="cpu", weights_only=True))
  else:
    import torchvision  # pylint: disable=g-import-not-at-top
    net = torchvision.models.squeezenet1_1(weights=None)
  return net.eval()


def bench_model(name: str, batches, repeats: int, rows: list):
  import torch  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  spec = models.get(name, pretrained=(name == "efficientnet_lite0"), include_top=True)
  net = torch_model(name)
  if name != "efficientnet_lite0":  # Same random weights in both frameworks.
    with tempfile.TemporaryDirectory() as d:
      torch.save(net.state_dict(), os.path.join(d, "w.pth"))
      spec = models.get(name, pretrained=True, include_top=True,
                        weights_path=os.path.join(d, "w.pth"))
  for bs in batches:
    x = np.random.default_rng(0).normal(size=(bs, 224, 224, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    predict = export.make_cpu_predictor(spec, batch_size=bs, outputs=("logits",),
                                        image_size=224)
    plain = xla_cpu.jit(lambda v, x: spec.module.apply(v, x, train=False)["logits"])
    xj = jnp.asarray(x)
    with torch.no_grad():
      ref = net(xt).numpy()
    err = np.abs(predict(x)["logits"] - ref).max() / np.abs(ref).max()
    onnx_predict = export.make_cpu_predictor(spec, batch_size=bs, outputs=("logits",),
                                             engine="onnx", image_size=224)
    err_onnx = np.abs(onnx_predict(x)["logits"] - ref).max() / np.abs(ref).max()
    print(f"# {name} batch {bs}: fgjax ONNX predictor max rel err vs torch "
          f"{err_onnx:.2e}", flush=True)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "m.onnx")
      torch.onnx.export(net, (xt,), path, input_names=["x"], output_names=["y"],
                        dynamo=False)
      opts = ort.SessionOptions()
      opts.intra_op_num_threads = 2
      opts.inter_op_num_threads = 1
      opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
      sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x_nchw = xt.numpy()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    xt_cl = xt.contiguous(memory_format=torch.channels_last)

    def torch_eager(model, inp):
      with torch.no_grad():
        return model(inp)

    results = timeit_interleaved({
        "fgjax make_cpu_predictor engine='onnx' (own export, onnxruntime)":
            lambda: onnx_predict(x),
        "ONNX Runtime (torch.onnx.export)": lambda: sess.run(None, {"x": x_nchw}),
        "fgjax make_cpu_predictor engine='xla'": lambda: predict(x),
        "fgjax plain jit (BN, auto depthwise)":
            lambda: plain(spec.variables, xj).block_until_ready(),
        "PyTorch eager": lambda: torch_eager(net, xt),
        "PyTorch eager channels_last": lambda: torch_eager(net_cl, xt_cl),
    }, repeats)
    for k, v in results.items():
      rows.append((name, bs, k, v * 1e3, bs / v))
      print(f"# {name} bs={bs} {k}: {v * 1e3:.2f} ms", flush=True)
    print(f"# {name} batch {bs}: fgjax predictor max rel err vs torch {err:.2e}",
          flush=True)


def make_train_step(spec):
  """(variables, x) -> (variables, loss): one SGD step on mean(pooled features^2).

  Compiled like fgjax.train's update step (`xla_cpu.jit`), BN in train mode.
  """

  @xla_cpu.jit
  def step(variables, x):
    def loss(params):
      out, upd = spec.module.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
      return jnp.mean(out["pooled"] ** 2), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 1e-3 * g, variables["params"], g)
    return {"params": params, **upd}, l

  return step


def bench_train(name: str, bs: int, repeats: int, rows: list):
  """One SGD step (forward + backward + update, BN in train mode), fgjax vs PyTorch.

  Loss: mean of the squared pooled backbone features, the same in both frameworks.
  Engines are timed in alternating blocks (`timeit_blocks`).
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  spec = models.get(name)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(bs, 224, 224, 3)), jnp.float32)
  step = make_train_step(spec)

  state = {"v": spec.variables}

  def run_jax():
    state["v"], l = step(state["v"], x)
    l.block_until_ready()

  def torch_step(net, opt, xt):
    def run():
      opt.zero_grad()
      feats = net.extract_features(xt) if hasattr(net, "extract_features") else \
          net.features(xt)
      loss = feats.mean((2, 3)).pow(2).mean()
      loss.backward()
      opt.step()
    return run

  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  net = torch_model(name).train()
  net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
  results = timeit_blocks({
      "train step fgjax jit": run_jax,
      "train step PyTorch eager": torch_step(
          net, torch.optim.SGD(net.parameters(), lr=1e-3), xt),
      "train step PyTorch eager channels_last": torch_step(
          net_cl, torch.optim.SGD(net_cl.parameters(), lr=1e-3),
          xt.contiguous(memory_format=torch.channels_last)),
  }, repeats)
  for k, v in results.items():
    rows.append((name, bs, k, v * 1e3, bs / v))
    print(f"# {name} bs={bs} {k}: {v * 1e3:.1f} ms", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="efficientnet_lite0,squeezenet1_1")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--no-train", action="store_true")
  parser.add_argument("--no-inference", action="store_true")
  parser.add_argument("--train-repeats", type=int, default=4)
  parser.add_argument("--retain-freed-memory", action="store_true",
                      help="glibc malloc keeps freed blocks (applied at import time)")
  args = parser.parse_args()
  print("# uptime:", subprocess.run(["uptime"], capture_output=True, text=True)
        .stdout.strip())
  print("# retain_freed_memory:", args.retain_freed_memory)
  rows = []
  for name in args.models.split(","):
    if not args.no_inference:
      bench_model(name, [int(b) for b in args.batches.split(",")], args.repeats, rows)
  if not args.no_train:
    for name in args.models.split(","):
      bench_train(name, 32, args.train_repeats, rows)
  print("| model | batch | engine | ms / batch | images / s |")
  print("|---|---|---|---|---|")
  for name, bs, k, ms, ips in rows:
    print(f"| {name} | {bs} | {k} | {ms:.1f} | {ips:.1f} |")
  print("# uptime:", subprocess.run(["uptime"], capture_output=True, text=True)
        .stdout.strip())


if __name__ == "__main__":
  main()
