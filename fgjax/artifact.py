"""A trained impostor network as one self-contained directory.

Layout (format_version 1):
  meta.json          backbone, scheme, embed_dim, num_classes, sigma, image_size,
                     resize_size, mean, std, format_version
  config.json        the full training config
  class_names.json   list of class names, index = label
  variables.msgpack  flax-serialised {'params': ..., 'batch_stats': ...} of the network
  impostors.npz      centers (M, E) float32 + labels (M,) int32, or, when compressed,
                     codes (M, m) uint8 + codebooks + rotation + labels

Loading needs neither the training data nor a checkpoint manager, only fgjax.
"""

import json
import os
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fgjax import impostors as impostors_lib
from fgjax import quantize
from fgjax.models import heads
from fgjax.models import xla_cpu

FORMAT_VERSION = 1


def export(path: str, *, config, class_names: list[str], variables: dict[str, Any],
           impostors: Optional[impostors_lib.ImpostorSet], sigma: float, spec,
           scheme, quantized: tuple[Any, Any] = (None, None)) -> str:
  """Writes the artifact directory `path`; returns it.

  `quantized` = (ProductQuantizer, codes) stores PQ codes + codebooks instead of the
  float impostors; the loaded model then classifies with ADC distances.
  """
  os.makedirs(path, exist_ok=True)
  meta = {
      "format_version": FORMAT_VERSION, "backbone": config.model.backbone,
      "scheme": scheme.name, "embed_dim": scheme.embed_dim,
      "has_classifier": scheme.has_classifier, "num_classes": len(class_names),
      "sigma": float(sigma), "image_size": int(config.input.image_size),
      "resize_size": int(config.input.resize_size),
      "mean": [float(x) for x in np.ravel(spec.mean)],
      "std": [float(x) for x in np.ravel(spec.std)],
  }
  _dump(os.path.join(path, "meta.json"), meta)
  _dump(os.path.join(path, "config.json"), config.to_dict())
  _dump(os.path.join(path, "class_names.json"), list(class_names))
  # Networks without BatchNorm have no batch_stats collection; keep the tree identical
  # to what `net.init` creates so that loading can restore into it.
  variables = {k: v for k, v in variables.items() if k == "params" or v}
  host = jax.tree.map(np.asarray, jax.device_get(variables))
  with open(os.path.join(path, "variables.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(host))
  pq, codes = quantized
  if impostors is not None and pq is not None:
    np.savez(os.path.join(path, "impostors.npz"), codes=np.asarray(codes, np.uint8),
             codebooks=np.asarray(pq.codebooks, np.float32),
             rotation=np.asarray(pq.rotation, np.float32),
             labels=np.asarray(impostors.labels, np.int32))
  elif impostors is not None:
    np.savez(os.path.join(path, "impostors.npz"),
             centers=np.asarray(impostors.centers, np.float32),
             labels=np.asarray(impostors.labels, np.int32))
  return path


ENGINES = ("jit", "xla", "onnx")


class Model:
  """A loaded artifact: preprocessing constants, network, impostors, class names.

  `engine` picks how the backbone runs: 'jit' (plain `jax.jit`, any device), or one
  of the CPU serving paths of `fgjax.models.inference` - 'xla' (BN folded, shifted
  depthwise, fixed batch) or 'onnx' (exported to onnxruntime; needs `onnx` and
  `onnxruntime`; the fastest on CPU, BENCHMARKS.md). The heads and the classifier
  are the same for all three, so they give the same predictions up to float error.
  """

  def __init__(self, path: str, engine: str = "jit", batch_size: int = 16):
    from fgjax import models  # The registry pulls in every backbone module.
    if engine not in ENGINES:
      raise ValueError(f"engine={engine!r} is unknown; use one of {', '.join(ENGINES)}.")
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"{path} is not an fgjax artifact (no meta.json). Train with launch.py, which "
          "writes <workdir>/artifact, or call fgjax.artifact.export().")
    self.meta = json.load(open(meta_path))
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')} "
                       f"is not supported (expected {FORMAT_VERSION}).")
    self.class_names = json.load(open(os.path.join(path, "class_names.json")))
    spec = models.get(self.meta["backbone"], pretrained=False)
    self.net = heads.ImpostorNet(
        backbone=spec.module, embed_dim=self.meta["embed_dim"],
        num_classes=self.meta["num_classes"] if self.meta["has_classifier"] else None)
    size = self.meta["image_size"]
    target = jax.jit(lambda r: self.net.init(r, jnp.zeros((1, size, size, 3)),
                                             train=False))(jax.random.key(0))
    target = jax.tree.map(np.asarray, dict(target))
    with open(os.path.join(path, "variables.msgpack"), "rb") as f:
      self.variables = flax.serialization.from_bytes(target, f.read())
    self.impostors, self.pq, self.codes = None, None, None
    imp_path = os.path.join(path, "impostors.npz")
    if os.path.exists(imp_path):
      z = np.load(imp_path)
      if "codes" in z:
        self.pq = quantize.ProductQuantizer(z["codebooks"], z["rotation"])
        self.codes = z["codes"]
        self.impostors = impostors_lib.ImpostorSet(None, z["labels"])
      else:
        self.impostors = impostors_lib.ImpostorSet(z["centers"], z["labels"])
    self.sigma = float(self.meta["sigma"])
    self.mean = np.asarray(self.meta["mean"], np.float32)
    self.std = np.asarray(self.meta["std"], np.float32)
    self.engine = engine
    if engine == "jit":
      self._forward = xla_cpu.jit(lambda v, x: self.net.apply(v, x, train=False))
    else:
      from fgjax.models import inference  # pylint: disable=g-import-not-at-top
      backbone_vars = {"params": self.variables["params"]["backbone"]}
      stats = self.variables.get("batch_stats", {}).get("backbone")
      if stats:
        backbone_vars["batch_stats"] = stats
      features = inference.make_cpu_predictor(spec, backbone_vars, batch_size,
                                              engine=engine)
      heads_fn = jax.jit(lambda v, f: self.net.apply(
          v, f, method=heads.ImpostorNet.heads))
      self._forward = lambda v, x: heads_fn(v, jnp.asarray(features(np.asarray(x))))

  def log_probs(self, images: np.ndarray) -> np.ndarray:
    """(N, C) class log-probabilities of normalised NHWC images.

    Impostor networks: the RBF rule, eq. (3), over all impostors; ConvNets: softmax.
    """
    out = self._forward(self.variables, np.asarray(images, np.float32))
    if self.pq is not None:  # Eq. (3) on ADC distances: no impostor is decoded.
      sq = quantize.adc_squared_distances(self.pq, out["embedding"], self.codes)
      return np.asarray(quantize.rbf_log_probs_from_sq_distances(
          sq, self.impostors.labels, self.sigma, len(self.class_names)))
    if self.impostors is not None:
      return np.asarray(impostors_lib.rbf_log_probs(
          out["embedding"], self.impostors, self.sigma,
          num_classes=len(self.class_names)))
    return np.asarray(jax.nn.log_softmax(out["logits"], axis=-1))


def _dump(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)
