"""benchmarks/gpu.py's throughput part: training images/s of the trainer's own jitted
update (train.Run.make_update, every layer training, BatchNorm in train mode) on one fixed
batch of random images, and of a PyTorch eager Lite0 step on the same GPU."""

import dataclasses
import math
import time
from typing import Any

import numpy as np

from benchmarks import gpu_devices
from benchmarks.gpu_record import Skipped

# The registered name of the random-image data source of the throughput part.
SYNTHETIC_SOURCE = "gpu_benchmark_synthetic"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The part's flags: batch, crop side, timed and warm-up steps, classes, impostors
  (loose), toy sizes (small_cnn), and whether to compare with PyTorch."""
  batch_size: int
  image_size: int
  steps: int
  warmup: int
  num_classes: int
  num_impostors: int
  smoke: bool
  torch: bool


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


def throughput_config(scheme: str, sizes: Sizes):
  """A training config of Lite0 (small_cnn with --smoke), every layer training, over
  the synthetic source; the same fields a cars196 run of that scheme would set."""
  from configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_config()
  c.scheme = scheme
  c.num_devices = 1
  c.data.source = SYNTHETIC_SOURCE
  c.data.synthetic_classes = sizes.num_classes
  c.data.synthetic_train = sizes.num_impostors
  c.model.backbone = "small_cnn" if sizes.smoke else "efficientnet_lite0"
  c.model.pretrained = False  # random weights time the same as ImageNet ones
  c.model.trainable = "all"
  c.train.cache_features = False
  c.train.batch_size = sizes.batch_size
  c.train.num_steps = sizes.steps + sizes.warmup + 1
  c.input.image_size = sizes.image_size
  c.input.resize_size = sizes.image_size
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


def fgjax_throughput(scheme: str, sizes: Sizes) -> dict[str, Any]:
  """Images/s of the trainer's jitted update (train.Run.make_update, state donated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  _register_synthetic_source()
  config = throughput_config(scheme, sizes)
  run = train.Run(config)
  assert run.forward == "train", run.forward  # BatchNorm in train mode, all layers
  update = run.make_update()
  state = _synthetic_state(run)
  batch = _synthetic_batch(run, config.train.batch_size, config.input.image_size)
  t0 = time.perf_counter()
  state, metrics = update(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(sizes.warmup):
    state, metrics = update(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(sizes.steps):
    state, metrics = update(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"loss {loss} after {int(state.step)} steps")
  step_s = seconds / sizes.steps
  return {"framework": "fgjax", "scheme": scheme, "backbone": config.model.backbone,
          "batch_size": config.train.batch_size, "image_size": config.input.image_size,
          "num_classes": run.num_classes,
          "num_impostors": (None if state.impostors is None
                            else int(state.impostors.centers.shape[0])),
          "loss_terms": run.objective.describe(), "steps": sizes.steps,
          "compile_s": round(compile_s, 3), "step_ms": round(1e3 * step_s, 3),
          "images_per_s": round(config.train.batch_size / step_s, 2),
          "final_loss": loss, "peak_device_bytes": gpu_devices.peak_device_bytes()}


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


def torch_throughput(sizes: Sizes) -> dict[str, Any]:
  """Images/s of a PyTorch eager Lite0 step: forward, CE, backward, Adam (train mode)."""
  torch = gpu_devices.torch_cuda(sizes.torch)
  if sizes.smoke:  # the smoke sizes have no Lite0 to compare against
    raise Skipped("PyTorch comparison skipped: --smoke (no small_cnn in PyTorch)")
  dev = torch.device("cuda")
  net, source = _torch_lite0(torch, sizes.num_classes)
  net = net.to(dev).train()
  opt = torch.optim.Adam(net.parameters(), lr=3e-4, weight_decay=5e-4)
  b, s = sizes.batch_size, sizes.image_size
  x = torch.randn(b, 3, s, s, device=dev)
  y = torch.arange(b, device=dev) % sizes.num_classes
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    return loss

  torch.cuda.reset_peak_memory_stats()
  for _ in range(sizes.warmup + 1):
    step()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(sizes.steps):
    loss = step()
  torch.cuda.synchronize()
  step_s = (time.perf_counter() - t0) / sizes.steps
  return {"framework": "torch eager", "scheme": "ce", "model_source": source,
          "torch": torch.__version__, "batch_size": b, "image_size": s,
          "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
          "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
          "steps": sizes.steps, "step_ms": round(1e3 * step_s, 3),
          "images_per_s": round(b / step_s, 2), "final_loss": float(loss),
          "peak_device_bytes": int(torch.cuda.max_memory_allocated())}
