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

Loading needs neither the training data nor a checkpoint manager, only fgjax: the
network is rebuilt through the same factory as in training (fgjax.models.nets.build).
"""

import os
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
ENGINES = ("jit", "xla", "onnx")


def export(path: str, *, config, network: nets.Network, class_names: list[str],
           variables: dict[str, Any], impostors: Optional[impostors_lib.ImpostorSet],
           sigma: float, quantized: tuple[Any, Any] = (None, None)) -> str:
  """Writes the artifact directory `path`; returns it.

  `quantized` = (ProductQuantizer, codes) stores PQ codes + codebooks instead of the
  float impostors; the loaded model then classifies with ADC distances.
  """
  os.makedirs(path, exist_ok=True)
  meta = {
      "format_version": FORMAT_VERSION, "net": network.name,
      "model": config.model.to_dict(), "has_logits": network.has_logits,
      "num_classes": len(class_names), "sigma": float(sigma),
      "image_size": int(config.input.image_size),
      "resize_size": int(config.input.resize_size),
      "mean": [float(x) for x in np.ravel(network.spec.mean)],
      "std": [float(x) for x in np.ravel(network.spec.std)],
  }
  workdir_lib.write_json(os.path.join(path, "meta.json"), meta)
  workdir_lib.write_json(os.path.join(path, "config.json"), config.to_dict())
  workdir_lib.write_json(os.path.join(path, "class_names.json"), list(class_names))
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


class Model:
  """A loaded artifact: preprocessing constants, network, impostors, class names.

  `engine` picks how the network runs: 'jit' (`jax.jit`, any device), or one of the CPU
  serving paths of `fgjax.export` - 'xla' (BN folded, fixed batch) or 'onnx' (exported
  to onnxruntime; needs `onnx` and `onnxruntime`; the fastest on CPU, BENCHMARKS.md).
  All three run the whole network and give the same predictions up to float error; an
  engine that cannot serve a network refuses when the model loads, naming the op.
  """

  def __init__(self, path: str, engine: str = "jit", batch_size: int = 16):
    if engine not in ENGINES:
      raise ValueError(f"engine={engine!r} is unknown; use one of {', '.join(ENGINES)}.")
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"{path} is not an fgjax artifact (no meta.json). Train with launch.py, which "
          "writes <workdir>/artifact, or call fgjax.artifact.export().")
    self.meta = workdir_lib.read_json(meta_path)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')} "
                       f"is not supported (expected {FORMAT_VERSION}); export it again "
                       "with this version of fgjax.")
    self.class_names = workdir_lib.read_json(os.path.join(path, "class_names.json"))
    self.network = nets.build(ml_collections.ConfigDict(self.meta["model"]),
                              self.meta["num_classes"], pretrained=False,
                              net=self.meta["net"])
    target = jax.eval_shape(lambda: self.network.init(0, self.meta["image_size"]))
    with open(os.path.join(path, "variables.msgpack"), "rb") as f:
      self.variables = flax.serialization.from_bytes(target, f.read())
    self.impostors, self.pq, self.codes = None, None, None
    imp_path = os.path.join(path, "impostors.npz")
    if os.path.exists(imp_path):
      with np.load(imp_path) as z:
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
    self._explain = None
    keys = ("logits",) if self.impostors is None else ("embedding",)
    module = self.network.module
    if engine == "jit":
      jitted = xla_cpu.jit(
          lambda v, x: {k: module.apply(v, x, train=False)[k] for k in keys})
      self.forward = lambda x: jitted(self.variables, x)
    else:
      from fgjax import export  # pylint: disable=g-import-not-at-top
      self.forward = export.make_cpu_predictor(
          module, self.variables, batch_size, outputs=keys, engine=engine,
          bn_epsilon=self.network.spec.bn_epsilon, image_size=self.meta["image_size"])

  def explain(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Where the network looks: {'heatmap' (N, I, J), 'box' (N, 4) normalised}.

    The localization module's prediction and box for ELoPE's localized network, else
    the channel mean of the last conv map (ELoPE section 5) and its box at the
    config's threshold. Runs with jax.jit whatever the serving engine.
    """
    if self._explain is None:
      module, tau = self.network.module, float(self.meta["model"]["localizer_tau"])
      outputs = self.network.output_shapes(self.meta["image_size"])

      def looks(v, x):
        out = module.apply(v, x, train=False)
        if "heatmap" in outputs:
          return {"heatmap": out["heatmap"], "box": out["box"]}
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
    if self.pq is not None:  # Eq. (3) on ADC distances: no impostor is decoded.
      sq = quantize.adc_squared_distances(self.pq, out["embedding"], self.codes)
      return np.asarray(quantize.rbf_log_probs_from_sq_distances(
          sq, self.impostors.labels, self.sigma, len(self.class_names)))
    if self.impostors is not None:
      return np.asarray(impostors_lib.rbf_log_probs(
          out["embedding"], self.impostors, self.sigma,
          num_classes=len(self.class_names)))
    return np.asarray(jax.nn.log_softmax(out["logits"], axis=-1))
