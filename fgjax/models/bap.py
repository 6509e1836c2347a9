"""Bilinear attention pooling (BAP) networks and WS-DAN's attention cropping / dropping.

Hu & Qi, "See Better Before Looking Closer: Weakly Supervised Data Augmentation Network
for Fine-Grained Visual Classification" (WS-DAN, arXiv 1901.09891, official code
GuYuc/WS-DAN.PyTorch), as Coarse2Fine (Eshratifar et al., /work/shared/papers/
coarse2fine.md, "Bilinear Attention Pooling", eq. 1 and Fig. 4) uses it:

  A = ReLU(BN(conv1x1(F)))                     attention maps (N, H, W, M), A >= 0
  f_m = sum_{h,w} A_m(h, w) F(h, w) / (H W)    part features (N, M, C)
  f <- sign(f) sqrt(|f| + 1e-12)               signed square root (WS-DAN)
  f <- f / max(||f||, 1e-12)                   l2 over the whole M*C vector (WS-DAN)
  features = bap_scale * f                     what the heads read (N, M*C)

Registered networks (config.model.net):
  bap           BAP -> Dense(C) 'classifier'. Outputs 'attention' (N, H, W, M),
                'part_features' (N, M, C) (the unscaled unit f: what the attention center
                loss reads, as WS-DAN's `feature_matrix`), 'features' (N, M*C),
                'embedding' (= features), 'logits'. With config.model.attention_crop_drop
                also 'crop_logits' and 'drop_logits' (WS-DAN section 3.3, below).
  bap_impostor  BAP -> Dense(d_em) 'embed', no classifier: the impostor RBF rule
                (impostor paper eq. 3) on BAP features, for the fixed / loose schemes.
Both heads read only the backbone's 'map', so head-only training on cached trunk
outputs (config.model.trainable='head', config.train.cache_features) works.

The attention's BatchNorm uses batch statistics only where the run updates them
(forward 'train', config.model.trainable='all'); elsewhere (a frozen backbone, cached
features, evaluation) it uses its running statistics, a fixed affine map, so training
and evaluation compute the same thing. Its variables are named like a ConvBN's
('conv', 'bn'), so fgjax.export folds it with the backbone's BatchNorms.
"""

import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax import losses
from fgjax.models import batch_norm
from fgjax.models import layers
from fgjax.models import localize
from fgjax.models import nets

# WS-DAN.PyTorch train.py / eval: crop and drop thresholds (fractions of the map's max),
# the box padding, and the test-time crop of the mean map.
CROP_THETA = (0.4, 0.6)
DROP_THETA = (0.2, 0.5)
CROP_PADDING = 0.1
TEST_CROP_THETA = 0.1
TEST_CROP_PADDING = 0.05
_EPS = 1e-12  # WS-DAN's EPSILON in the signed square root and F.normalize


def bilinear_attention_pool(features: jax.Array, attention: jax.Array,
                            scale: float = 100.0) -> tuple[jax.Array, jax.Array]:
  """BAP (module docstring; Coarse2Fine eq. 1 with per-map average pooling, Fig. 4).

  Args:
    features: (N, H, W, C) feature maps F.
    attention: (N, H, W, M) attention maps A (>= 0 in the networks).
    scale: the factor on the unit vector (WS-DAN multiplies by 100 before its fc).

  Returns:
    (part_features (N, M, C): the signed-square-rooted, l2-normalised (over all M*C
    entries together) part features, unscaled; features (N, M*C): scale times their
    flattening, row-major in (m, c)).
  """
  if features.ndim != 4 or attention.ndim != 4 or features.shape[:3] != attention.shape[:3]:
    raise ValueError(f"BAP needs features (N, H, W, C) and attention (N, H, W, M) on one "
                     f"grid; got {tuple(features.shape)} and {tuple(attention.shape)}.")
  n, h, w, _ = features.shape
  pooled = jnp.einsum("nhwm,nhwc->nmc", attention, features) / (h * w)
  pooled = jnp.sign(pooled) * jnp.sqrt(jnp.abs(pooled) + _EPS)
  flat = pooled.reshape(n, -1)
  unit = losses.l2_normalize(flat, _EPS)  # finite gradients for an all-zero map
  return unit.reshape(pooled.shape), scale * unit


def orthogonal_kernel_init(base: Any = layers.conv_init):
  """Coarse2Fine Algorithm 1, lines 2-3, as a flax initializer of a 1x1 conv kernel.

  The kernel (1, 1, C, M) is the matrix X (M, C) of the M attention filters (PyTorch's
  (out, in) order); it is drawn from `base`, decomposed X = U S V^T (reduced SVD), and
  replaced by V^T: the M filters become orthonormal vectors of R^C. Needs M <= C (the
  paper: 8 maps on 768 channels).
  """
  def init(key, shape, dtype=jnp.float32):
    *spatial, c, m = shape
    if math.prod(spatial) != 1:
      raise ValueError(f"orthogonal attention init is for 1x1 kernels, got {shape}.")
    if m > c:
      raise ValueError(f"config.model.attention_orthogonal_init needs "
                       f"config.model.attention_maps={m} <= the backbone's channels "
                       f"{c} (M orthonormal filters in R^C); lower attention_maps or "
                       "turn the orthogonal init off.")
    x = base(key, shape, jnp.float32).reshape(c, m).T  # (M, C)
    vt = jnp.linalg.svd(x, full_matrices=False)[2]     # (M, C), orthonormal rows
    return vt.T.reshape(shape).astype(dtype)
  return init


class AttentionMaps(nn.Module):
  """WS-DAN's attention block: 1x1 conv (no bias) + BN + ReLU, (N, H, W, C) -> (N, H, W, M).

  Attributes:
    maps: M (config.model.attention_maps).
    orthogonal: Coarse2Fine's orthogonal init of the conv (config.model.
      attention_orthogonal_init); else torchvision's kaiming init (layers.conv_init).
    bn_epsilon: the backbone's (fgjax.export folds every BN with one epsilon).
  """
  maps: int
  orthogonal: bool = False
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool, folded: bool = False,
               conv_impl: str = "auto", dtype: Any = jnp.float32) -> jax.Array:
    init = orthogonal_kernel_init() if self.orthogonal else layers.conv_init
    y = layers.Conv2D(self.maps, 1, use_bias=folded, conv_impl=conv_impl, dtype=dtype,
                      kernel_init=init, name="conv")(x)
    if not folded:
      y = batch_norm.BatchNorm(0.9, self.bn_epsilon, dtype, name="bn")(
          y, use_running_average=not update_stats)
    return nn.relu(y)


def pick_maps(key: jax.Array, attention: jax.Array, count: int) -> jax.Array:
  """WS-DAN's training choice: per image `count` maps drawn (with replacement) with
  probability proportional to sqrt(sum_{h,w} A_m) (WS-DAN.PyTorch, WSDAN.forward).

  Args: attention (N, H, W, M) >= 0. Returns (count, N, H, W), without gradient.
  """
  attention = jax.lax.stop_gradient(attention)
  logits = 0.5 * jnp.log(jnp.sum(attention, axis=(1, 2)) + _EPS)  # log sqrt(mass)
  picks = jax.random.categorical(key, logits, shape=(count, attention.shape[0]))
  return jnp.moveaxis(attention, -1, 1)[jnp.arange(attention.shape[0]), picks]


def _upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(N, H, W) -> (N, h, w), bilinear (F.upsample_bilinear in WS-DAN)."""
  return jax.image.resize(maps, (maps.shape[0], *size), "linear")


def threshold_boxes(maps: jax.Array, theta: jax.Array, padding: float) -> jax.Array:
  """WS-DAN's crop box (batch_augment, mode 'crop'): the smallest box of the pixels with
  A >= theta * max(A), widened by `padding` (a fraction of the side) and clipped.

  Args: maps (N, h, w) at image resolution; theta (N,) or scalar in [0, 1].
  Returns: (N, 4) normalised (ymin, xmin, ymax, xmax). The max pixel is always on, so
  no box is empty (an all-zero map gives the whole image).
  """
  n, h, w = maps.shape
  top = jnp.max(maps, axis=(1, 2), keepdims=True)
  on = (maps >= jnp.reshape(theta, (-1, 1, 1)) * top).astype(jnp.float32)

  def extent(mask, size):  # (N, size) 0/1 -> first / (last + 1), normalised
    idx = jnp.arange(size)
    first = jnp.min(jnp.where(mask > 0, idx, size), axis=1)
    last = jnp.max(jnp.where(mask > 0, idx, -1), axis=1)
    return (jnp.clip(first / size - padding, 0.0, 1.0),
            jnp.clip((last + 1) / size + padding, 0.0, 1.0))

  y0, y1 = extent(jnp.max(on, axis=2), h)
  x0, x1 = extent(jnp.max(on, axis=1), w)
  return jnp.stack([y0, x0, y1, x1], axis=1).astype(jnp.float32)


def attention_crop(images: jax.Array, maps: jax.Array, theta: jax.Array,
                   padding: float) -> jax.Array:
  """Attention cropping (WS-DAN section 3.3): each image cropped to its map's box and
  resized back to the input size (localize.crop_and_resize). (N, S, S, 3), (N, H, W)."""
  size = images.shape[1:3]
  boxes = threshold_boxes(_upsample(maps, size), theta, padding)
  return localize.crop_and_resize(images, boxes, size)


def attention_drop(images: jax.Array, maps: jax.Array, theta: jax.Array) -> jax.Array:
  """Attention dropping (WS-DAN section 3.3): the pixels where the upsampled map is
  >= theta * max set to 0 (the mean colour of normalised images)."""
  up = _upsample(maps, images.shape[1:3])
  top = jnp.max(up, axis=(1, 2), keepdims=True)
  keep = (up < jnp.reshape(theta, (-1, 1, 1)) * top).astype(images.dtype)
  return images * keep[..., None]


class BAPBase(nets.PooledNet):
  """Backbone 'map' -> attention -> BAP -> `head_from_features` (module docstring).

  The configured pooling (config.model.pooling) is not used: BAP replaces it.

  Attributes (besides PooledNet's):
    attention_maps: the AttentionMaps block ('attention_maps' parameter group).
    bap_scale: the factor on the unit BAP vector (config.model.bap_scale).
  """
  attention_maps: Optional[nn.Module] = None
  bap_scale: float = 100.0

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes),
               embed_dim=int(model_config.embed_dim) if cls.embedding_layer else None,
               **cls.bap_fields(spec, model_config))

  @staticmethod
  def bap_fields(spec, model_config) -> dict[str, Any]:
    """The BAP attributes from config.model (shared with the Coarse2Fine network)."""
    maps = model_config.get("attention_maps")
    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 1:
      raise ValueError(f"config.model.attention_maps={maps!r} must be an int >= 1 "
                       "(WS-DAN: 32; Coarse2Fine: 8).")
    return {"attention_maps": AttentionMaps(
                maps, bool(model_config.get("attention_orthogonal_init", False)),
                float(spec.bn_epsilon or 1e-5)),
            "bap_scale": float(model_config.get("bap_scale", 100.0))}

  @staticmethod
  def extra_reads(model_config):
    del model_config
    return ("map",)

  def attend(self, feature_map: jax.Array, train: bool) -> dict[str, jax.Array]:
    """{'attention', 'part_features', 'features'} of one (N, H, W, C) feature map."""
    backbone = self.backbone
    attention = self.attention_maps(
        feature_map, update_stats=train and self.is_mutable_collection("batch_stats"),
        folded=backbone.fold_bn, conv_impl=backbone.conv_impl, dtype=backbone.dtype)
    part, features = bilinear_attention_pool(feature_map, attention, self.bap_scale)
    return {"attention": attention, "part_features": part, "features": features}

  def head(self, backbone_outputs, train=False):
    out = self.attend(backbone_outputs["map"], train)
    return {**out, **self.head_from_features(out["features"])}


@nets.register("bap")
class BAPNet(BAPBase):
  """BAP -> Dense(C) 'classifier' (WS-DAN's fc on 100 x the unit BAP vector).

  With `crop_drop` (config.model.attention_crop_drop), WS-DAN section 3.3 in the jitted
  step, batched with fixed shapes: while training, per image two maps drawn by
  `pick_maps`, one crops (theta ~ U(0.4, 0.6) of its max, box padded by 0.1) and one
  drops (theta ~ U(0.2, 0.5)); the crop and the dropped image run through the same
  backbone and head again ('crop_logits', 'drop_logits'), without gradient into the
  augmentation (WS-DAN computes it under torch.no_grad). At evaluation the mean map
  crops at theta 0.1 (padding 0.05) and 'logits' is the mean of the raw and the crop's
  logits (WS-DAN eval); 'drop_logits' then drops at the midpoint theta 0.35 of the mean
  map (an output only, so loss terms that read it type-check).
  """
  has_logits = True
  crop_drop: bool = False

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes),
               crop_drop=bool(model_config.get("attention_crop_drop", False)),
               **cls.bap_fields(spec, model_config))

  @nn.compact
  def head_from_features(self, features):
    return {"embedding": features,
            "logits": nn.Dense(self.num_classes, name="classifier")(features)}

  def __call__(self, x, train=False, backbone_train=None):
    out = super().__call__(x, train=train, backbone_train=backbone_train)
    if not self.crop_drop:
      return out
    bt = train if backbone_train is None else backbone_train
    classify = lambda images: self.head(self.backbone(images, train=bt), train)["logits"]  # noqa: E731
    n = x.shape[0]
    if train:
      key_pick, key_crop, key_drop = jax.random.split(self.make_rng("augment"), 3)
      crop_map, drop_map = pick_maps(key_pick, out["attention"], 2)
      crops = attention_crop(x, crop_map,
                             jax.random.uniform(key_crop, (n,), minval=CROP_THETA[0],
                                                maxval=CROP_THETA[1]), CROP_PADDING)
      drops = attention_drop(x, drop_map,
                             jax.random.uniform(key_drop, (n,), minval=DROP_THETA[0],
                                                maxval=DROP_THETA[1]))
    else:
      mean_map = jnp.mean(out["attention"], axis=-1)
      crops = attention_crop(x, mean_map, TEST_CROP_THETA, TEST_CROP_PADDING)
      drops = attention_drop(x, mean_map, sum(DROP_THETA) / 2)
    out["crop_logits"] = classify(jax.lax.stop_gradient(crops))
    out["drop_logits"] = classify(jax.lax.stop_gradient(drops))
    if not train:
      out["logits"] = 0.5 * (out["logits"] + out["crop_logits"])
    return out


@nets.register("bap_impostor")
class BAPImpostorNet(BAPBase):
  """BAP -> Dense(d_em) 'embed'; no classifier: the impostor rule (eq. 3) classifies."""
  embedding_layer = "embed"

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    if model_config.get("attention_crop_drop"):
      raise ValueError("config.model.attention_crop_drop=True needs net 'bap' (it adds "
                       "softmax heads on the crops); net 'bap_impostor' has none.")
    return super().create(spec, pool, model_config, num_classes)

  @nn.compact
  def head_from_features(self, features):
    return {"embedding": nn.Dense(self.embed_dim, name="embed")(features)}


def attention_pictures(run: Any, variables: dict[str, Any], workdir: str,
                       count: int = 8) -> str:
  """<workdir>/attention.png: the attention maps of the first `count` test images (val
  where there is no test split), per map and their mean (visualize.attention_grid).
  Returns the file name relative to the workdir, or why nothing was drawn."""
  from fgjax import visualize  # pylint: disable=g-import-not-at-top
  split = "test" if run.outputs.has("test") else "val"
  if not run.outputs.has(split):
    return "not drawn: no test or val split"
  sample = run.outputs.images(split, count)
  module = run.network.module
  attention = jax.jit(lambda v, x: module.apply(v, x, train=False)["attention"])(
      variables, sample["image"])
  try:
    visualize.attention_grid(
        os.path.join(workdir, "attention.png"),
        visualize.to_uint8(sample["image"], run.network.spec.mean, run.network.spec.std),
        jax.device_get(attention), [run.splits.class_names[c] for c in sample["label"]])
  except ImportError as e:  # The numbers stay; only the picture needs matplotlib.
    return f"not drawn: {e}"
  return "attention.png"
