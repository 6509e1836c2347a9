"""A trained network as one self-contained directory.

Layout (format_version 2):
  meta.json          format_version, net, model (config.model: backbone, pooling,
                     embed_dim, ...), has_logits, num_classes, sigma, image_size,
                     resize_size, mean, std
  config.json        the full training config
  class_names.json   list of class names, index = label
  variables.msgpack  flax-serialised {'params': ..., 'batch_stats': ...} of the network
  impostors.npz      centers (M, E) float32 + labels (M,) int32, or, when compressed,
                     codes (M, m) uint8 + codebooks + rotation + labels
  int8_calibration.json  activation ranges of the int8 engine (fgjax.export.int8),
                     calibrated on the run's training images at export; meta.json
                     'int8' says on how many, or why the engine was refused
  early_exit.npz     the exit heads of sequential early exit (fgjax.early_exit), when
                     trained with config.early_exit.exits; meta.json 'early_exit' has
                     the exits, head kind, thresholds, alpha and rule
  manifest.json      {'files': {name: {'size', 'sha256'}}} of every file above; written
                     last, so an artifact without it is incomplete

`export` writes into a sibling staging directory and renames it into place: a killed
export leaves the previous artifact whole (killed between the two renames, set aside,
where the next export puts it back), never a mix. `Model` verifies the manifest and the
files' consistency when it loads, naming the file and the fix.

Loading needs neither the training data nor a checkpoint manager, only fgjax: the
network is rebuilt through the same factory as in training (fgjax.models.nets.build).
"""

import hashlib
import os
import shutil
from typing import Any, Optional

import flax.serialization
import jax
import ml_collections
import numpy as np

from fgjax import impostors as impostors_lib
from fgjax import quantize
from fgjax import workdir as workdir_lib
from fgjax.models import localize
from fgjax.models import nets
from fgjax.models import xla_cpu

FORMAT_VERSION = 2
ENGINES = ("jit", "xla", "onnx", "onnx-int8", "openvino")
MANIFEST = "manifest.json"
INT8_FILE = "int8_calibration.json"
EARLY_EXIT_FILE = "early_exit.npz"
# Siblings of the artifact directory: the export being written, and the previous
# artifact while the new one is renamed in.
_STAGING, _ASIDE = ".partial", ".old"
_REEXPORT = ("Export it again: rerun `python launch.py` with the run's --config and the "
             "same --workdir (a finished run restores its last checkpoint, evaluates and "
             "exports), or call fgjax.artifact.export().")


class ArtifactError(ValueError):
  """An artifact directory that is incomplete, damaged or inconsistent."""


def served_outputs(has_impostors: bool) -> tuple[str, ...]:
  """The network outputs a served model computes: the embedding for the RBF rule,
  else the logits."""
  return ("embedding",) if has_impostors else ("logits",)


def export(path: str, *, config, network: nets.Network, class_names: list[str],
           variables: dict[str, Any], impostors: Optional[impostors_lib.ImpostorSet],
           sigma: float, quantized: tuple[Any, Any] = (None, None),
           int8: Optional[dict[str, Any]] = None,
           early_exit: Optional[dict[str, Any]] = None) -> str:
  """Writes the artifact directory `path` atomically, replacing any previous one.

  `quantized` = (ProductQuantizer, codes) stores PQ codes + codebooks instead of the
  float impostors; the loaded model then classifies with ADC distances.
  `int8` = {'calibration' (fgjax.export.calibrate_int8 of the served outputs),
  'images', 'float_ops'} enables engine='onnx-int8'; {'refused': why} records why
  it cannot serve this network. `early_exit` = {'exits', 'kind', 'thresholds',
  'alpha', 'rule', 'heads'} (fgjax.early_exit.training.fit_for_run) stores the exit
  heads for `Model.early_exit`.
  """
  path = os.path.normpath(path)  # A trailing '/' would put the siblings inside it.
  _recover(path)
  staging = path + _STAGING
  os.makedirs(staging)
  meta = {
      "format_version": FORMAT_VERSION, "net": network.name,
      "model": config.model.to_dict(), "has_logits": network.has_logits,
      "num_classes": len(class_names), "sigma": float(sigma),
      "image_size": int(config.input.image_size),
      "resize_size": int(config.input.resize_size),
      "mean": [float(x) for x in np.ravel(network.spec.mean)],
      "std": [float(x) for x in np.ravel(network.spec.std)],
  }
  if int8 is not None:
    meta["int8"] = {k: v for k, v in int8.items() if k != "calibration"}
    if "calibration" in int8:
      workdir_lib.write_json(os.path.join(staging, INT8_FILE), int8["calibration"])
  if early_exit is not None:
    from fgjax.early_exit import heads as heads_lib  # pylint: disable=g-import-not-at-top
    meta["early_exit"] = {k: v for k, v in early_exit.items() if k != "heads"}
    arrays = {}
    for m, head in enumerate(early_exit["heads"]):
      arrays.update(heads_lib.to_arrays(head, f"exit{m}"))
    np.savez(os.path.join(staging, EARLY_EXIT_FILE), **arrays)
  workdir_lib.write_json(os.path.join(staging, "meta.json"), meta)
  workdir_lib.write_json(os.path.join(staging, "config.json"), config.to_dict())
  workdir_lib.write_json(os.path.join(staging, "class_names.json"), list(class_names))
  host = jax.tree.map(np.asarray, jax.device_get(variables))
  with open(os.path.join(staging, "variables.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(host))
  pq, codes = quantized
  if impostors is not None:
    rows = (dict(codes=np.asarray(codes, np.uint8),
                 codebooks=np.asarray(pq.codebooks, np.float32),
                 rotation=np.asarray(pq.rotation, np.float32)) if pq is not None
            else dict(centers=np.asarray(impostors.centers, np.float32)))
    if impostors.log_weights is not None:
      rows["log_weights"] = np.asarray(impostors.log_weights, np.float32)
    np.savez(os.path.join(staging, "impostors.npz"),
             labels=np.asarray(impostors.labels, np.int32), **rows)
  workdir_lib.write_json(os.path.join(staging, MANIFEST), {"files": {
      name: {"size": os.path.getsize(os.path.join(staging, name)),
             "sha256": _sha256(os.path.join(staging, name))}
      for name in sorted(os.listdir(staging))}})
  # A kill between these renames leaves no `path` but both whole directories; the
  # next export's _recover puts the old one back.
  if os.path.exists(path):
    os.rename(path, path + _ASIDE)
  os.rename(staging, path)
  shutil.rmtree(path + _ASIDE, ignore_errors=True)
  return path


def _recover(path: str) -> None:
  """Undoes what a killed export left beside `path`: the previous artifact set aside
  goes back in place unless a newer one is there, and a partial export is dropped."""
  aside = path + _ASIDE
  if os.path.isdir(aside):
    if os.path.exists(path):
      shutil.rmtree(aside)
    else:
      os.rename(aside, path)
  shutil.rmtree(path + _STAGING, ignore_errors=True)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _verify_manifest(path: str) -> None:
  """Raises ArtifactError unless every file of the manifest is there, whole."""
  manifest = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest):
    raise ArtifactError(
        f"{path} has no {MANIFEST}: the export was killed before it finished, or the "
        f"artifact predates manifests, so its files cannot be trusted. {_REEXPORT}")
  files = _read_json(path, MANIFEST)["files"]
  for name, want in files.items():
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise ArtifactError(f"{file} is missing (listed in {MANIFEST}). {_REEXPORT}")
    size = os.path.getsize(file)
    if size != want["size"]:
      raise ArtifactError(f"{file} has {size} bytes, {MANIFEST} says {want['size']}: "
                          f"truncated or replaced. {_REEXPORT}")
    if _sha256(file) != want["sha256"]:
      raise ArtifactError(f"{file} does not match its sha256 in {MANIFEST}: the file "
                          f"is damaged or was replaced. {_REEXPORT}")


def _read_json(path: str, name: str) -> Any:
  try:
    return workdir_lib.read_json(os.path.join(path, name))
  except (OSError, ValueError) as e:
    raise ArtifactError(f"{os.path.join(path, name)} is unreadable ({e}). "
                        f"{_REEXPORT}") from e


class Model:
  """A loaded artifact: preprocessing constants, network, impostors, class names.

  `engine` picks how the network runs: 'jit' (`jax.jit`, any device), or one of the CPU
  serving paths of `fgjax.export` - 'xla' (BN folded, fixed batch), 'onnx' (exported
  to onnxruntime), 'onnx-int8' (that graph quantised to int8 from the calibration
  stored at export) or 'openvino' (OpenVINO, an optional extra, at `precision` fp32,
  bf16 or int8; the fastest on CPU, BENCHMARKS.md section 13). fp32 engines give the
  same predictions up to float error, bf16 and int8 up to their rounding; an engine
  that cannot serve a network refuses when the model loads, naming the op.
  An incomplete, damaged or inconsistent artifact raises ArtifactError here, naming
  the file, rather than failing (or answering wrongly) at the first batch.
  """

  def __init__(self, path: str, engine: str = "jit", batch_size: int = 16,
               precision: str = "fp32"):
    if engine not in ENGINES:
      raise ValueError(f"engine={engine!r} is unknown; use one of {', '.join(ENGINES)}.")
    if engine != "openvino" and precision != "fp32":
      raise ValueError(f"precision={precision!r} is for engine='openvino'; engine="
                       f"{engine!r} has one precision (int8: engine='onnx-int8').")
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"{path} is not an fgjax artifact (no meta.json). Train with launch.py, which "
          "writes <workdir>/artifact, or call fgjax.artifact.export().")
    _verify_manifest(path)
    self.meta = _read_json(path, "meta.json")
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')} "
                       f"is not supported (expected {FORMAT_VERSION}); export it again "
                       "with this version of fgjax.")
    num_classes = self.meta["num_classes"]
    self.class_names = _read_json(path, "class_names.json")
    if not isinstance(self.class_names, list) or len(self.class_names) != num_classes:
      found = (f"{len(self.class_names)} names" if isinstance(self.class_names, list)
               else f"a {type(self.class_names).__name__}")
      raise ArtifactError(f"{os.path.join(path, 'class_names.json')} holds {found}, but "
                          f"the network has {num_classes} classes (meta.json "
                          f"num_classes). {_REEXPORT}")
    self.network = nets.build(ml_collections.ConfigDict(self.meta["model"]),
                              num_classes, pretrained=False, net=self.meta["net"])
    target = jax.eval_shape(lambda: self.network.init(0, self.meta["image_size"]))
    self.variables = _load_variables(os.path.join(path, "variables.msgpack"), target)
    self.impostors, self.pq, self.codes = None, None, None
    imp_path = os.path.join(path, "impostors.npz")
    if os.path.exists(imp_path):
      self.impostors, self.pq, self.codes = _load_impostors(imp_path, num_classes)
    elif not self.meta["has_logits"]:
      raise ArtifactError(f"{imp_path} is missing: network {self.meta['net']!r} has no "
                          f"softmax head and classifies with its impostors. {_REEXPORT}")
    self.sigma = float(self.meta["sigma"])
    self.mean = np.asarray(self.meta["mean"], np.float32)
    self.std = np.asarray(self.meta["std"], np.float32)
    self.engine = engine
    self.path = path
    self._explain = None
    self._sequential = None
    self._classify = None
    keys = served_outputs(self.impostors is not None)
    module = self.network.module
    if engine == "jit":
      jitted = xla_cpu.jit(
          lambda v, x: {k: module.apply(v, x, train=False)[k] for k in keys})
      # Put on the device once; NumPy variables would be copied in at every call.
      on_device = jax.device_put(self.variables)
      self.forward = lambda x: jitted(on_device, x)
    else:
      from fgjax import export  # pylint: disable=g-import-not-at-top
      int8 = (self._int8(path) if engine == "onnx-int8" or precision == "int8"
              else {})
      self.forward = export.make_cpu_predictor(
          module, self.variables, batch_size, outputs=keys, engine=engine,
          bn_epsilon=self.network.spec.bn_epsilon, image_size=self.meta["image_size"],
          int8_calibration=int8.get("calibration"), float_ops=int8.get("float_ops", ()),
          precision=precision)

  def _int8(self, path: str) -> dict[str, Any]:
    """{'calibration', 'float_ops'} for engine='onnx-int8', or why there are none."""
    info = self.meta.get("int8")
    if info is None or "refused" in info:
      why = (f"the export refused it: {info['refused']}" if info else
             "it was exported without (config.export.int8_calibration_images=0, or "
             "before fgjax had the int8 engine)")
      raise ArtifactError(
          f"{path} has no int8 calibration, so int8 engines cannot serve it: "
          f"{why}. Use engine='onnx' (fp32), or export again with "
          "--config.export.int8_calibration_images=64 (rerunning launch.py on the "
          "finished workdir exports without retraining).")
    return {"calibration": _read_json(path, INT8_FILE),
            "float_ops": tuple(info.get("float_ops", ()))}

  def early_exit(self, max_batch: int = 32):
    """The sequential early-exit classifier (fgjax.early_exit.sequential.Sequential)
    of the exits stored at export; built once, run with jax.jit."""
    if self._sequential is None:
      info = self.meta.get("early_exit")
      if info is None:
        raise ArtifactError(
            f"{self.path} has no early exits: train (or rerun launch.py on the finished "
            "workdir) with --config.early_exit.exits=\"('stage4','stage6','map')\" "
            "(backbone output names) to fit them.")
      from fgjax.early_exit import heads as heads_lib  # pylint: disable=g-import-not-at-top
      from fgjax.early_exit import sequential  # pylint: disable=g-import-not-at-top
      from fgjax.early_exit import training  # pylint: disable=g-import-not-at-top
      file = os.path.join(self.path, EARLY_EXIT_FILE)
      try:
        with np.load(file) as z:
          arrays = {k: z[k] for k in z.files}
        heads = [heads_lib.from_arrays(info["kind"], arrays, f"exit{m}")
                 for m in range(len(info["exits"]))]
      except (OSError, ValueError) as e:
        raise ArtifactError(f"{file} cannot be read ({e}). {_REEXPORT}") from e
      self._sequential = sequential.Sequential(
          self.network.module.backbone, training.backbone_variables(self.variables),
          info["exits"], heads, info["thresholds"], max_batch=max_batch)
    return self._sequential

  def explain(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Where the network looks: {'heatmap' (N, I, J), 'box' (N, 4) normalised}, and
    for the BAP networks also 'attention' (N, I, J, M), every attention map.

    The localization module's prediction and box for ELoPE's localized network, the
    mean attention map for the BAP networks (WS-DAN's localization), else the channel
    mean of the last conv map (ELoPE section 5); boxes at the config's threshold.
    Runs with jax.jit whatever the serving engine.
    """
    if self._explain is None:
      module, tau = self.network.module, float(self.meta["model"]["localizer_tau"])
      outputs = self.network.output_shapes(self.meta["image_size"])

      def looks(v, x):
        out = module.apply(v, x, train=False)
        if "heatmap" in outputs:
          return {"heatmap": out["heatmap"], "box": out["box"]}
        if "attention" in outputs:  # BAP networks: the mean attention map (WS-DAN)
          heat = out["attention"].mean(axis=-1)
          return {"heatmap": heat, "box": localize.heatmap_boxes(heat, tau),
                  "attention": out["attention"]}
        return {"heatmap": out["mean_map"],
                "box": localize.heatmap_boxes(out["mean_map"], tau)}
      jitted = xla_cpu.jit(looks)
      self._explain = lambda x: jitted(self.variables, x)
    return {k: np.asarray(v) for k, v in
            self._explain(np.asarray(images, np.float32)).items()}

  def log_probs(self, images: np.ndarray) -> np.ndarray:
    """(N, C) class log-probabilities of normalised NHWC images.

    Impostor networks: the RBF rule, eq. (3), over all impostors; ConvNets: softmax.
    """
    out = self.forward(np.asarray(images, np.float32))
    if self._classify is None:
      self._classify = self._classifier()
    return np.asarray(self._classify(*out.values()))

  def _classifier(self):
    """The jitted rule from the served output to log-probabilities. The impostors are
    arguments, put on the device once: run eagerly, the RBF rule cost ~230 ms per
    call for a 1,078-impostor digits model (0.2 ms jitted), and as compile-time
    constants a large impostor set would bloat every compilation."""
    num_classes, sigma = len(self.class_names), self.sigma
    if self.pq is not None:  # Eq. (3) on ADC distances: no impostor is decoded.
      rule = jax.jit(lambda e, pq, codes, labels, log_weights:
                     quantize.rbf_log_probs_from_sq_distances(
                         quantize.adc_squared_distances(pq, e, codes), labels, sigma,
                         num_classes, log_weights))
      args = jax.device_put((self.pq, self.codes, self.impostors.labels,
                             self.impostors.log_weights))
    elif self.impostors is not None:
      rule = jax.jit(lambda e, imps: impostors_lib.rbf_log_probs(
          e, imps, sigma, num_classes=num_classes))
      args = (jax.device_put(self.impostors),)
    else:
      rule, args = jax.jit(lambda z: jax.nn.log_softmax(z, axis=-1)), ()
    return lambda served: rule(served, *args)


def _load_variables(file: str, target: Any) -> dict[str, Any]:
  """The network variables of `file`, checked against the shapes of `target`."""
  try:
    with open(file, "rb") as f:
      variables = flax.serialization.from_bytes(target, f.read())
  # msgpack and flax raise many types (ValueError, KeyError, msgpack's own) on bad data.
  except Exception as e:  # pylint: disable=broad-except
    raise ArtifactError(f"{file} cannot be decoded ({type(e).__name__}: {e}). "
                        f"{_REEXPORT}") from e
  # flax restores whatever shapes the file holds: a mismatch would fail at the first
  # batch, not here.
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(target)}
  got = {jax.tree_util.keystr(k): np.shape(v)
         for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  wrong = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
  if wrong:
    raise ArtifactError(
        f"{file} does not fit the network of meta.json: {len(wrong)} arrays differ, "
        f"e.g. {wrong[0]} {got.get(wrong[0])} instead of {want.get(wrong[0])}. "
        f"{_REEXPORT}")
  return variables


def _load_impostors(file: str, num_classes: int) -> tuple[
    impostors_lib.ImpostorSet, Optional[quantize.ProductQuantizer], Optional[np.ndarray]]:
  """(impostors, pq, codes) of `file`; centers are None (and pq set) when compressed."""
  try:
    with np.load(file) as z:
      arrays = {k: z[k] for k in z.files}
  # A damaged zip raises BadZipFile, OSError or ValueError, depending on where.
  except Exception as e:  # pylint: disable=broad-except
    raise ArtifactError(f"{file} cannot be read ({type(e).__name__}: {e}). "
                        f"{_REEXPORT}") from e
  need = ("codes", "codebooks", "rotation", "labels") if "codes" in arrays else (
      "centers", "labels")
  missing = [k for k in need if k not in arrays]
  if missing:
    raise ArtifactError(f"{file} lacks {', '.join(missing)}. {_REEXPORT}")
  labels = arrays["labels"]
  rows = arrays["codes" if "codes" in arrays else "centers"]
  if labels.ndim != 1 or len(labels) != len(rows):
    raise ArtifactError(f"{file}: labels {labels.shape} do not match the {len(rows)} "
                        f"impostors. {_REEXPORT}")
  if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
    raise ArtifactError(f"{file}: impostor labels span {labels.min()}..{labels.max()}, "
                        f"outside the {num_classes} classes of meta.json. {_REEXPORT}")
  log_weights = arrays.get("log_weights")
  if log_weights is not None and log_weights.shape != labels.shape:
    raise ArtifactError(f"{file}: log_weights {log_weights.shape} do not match the "
                        f"{len(labels)} impostors. {_REEXPORT}")
  if "codes" in arrays:
    pq = quantize.ProductQuantizer(arrays["codebooks"], arrays["rotation"])
    return impostors_lib.ImpostorSet(None, labels, log_weights), pq, arrays["codes"]
  return impostors_lib.ImpostorSet(arrays["centers"], labels, log_weights), None, None
