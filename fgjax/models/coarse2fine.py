"""Coarse2Fine (Eshratifar et al., /work/shared/papers/coarse2fine.md) as net 'c2f'.

Section "Coarse2Fine Training", Fig. 5 and Algorithm 1:

  coarse pass  backbone(x) -> attention maps A (N, H, W, M) -> BAP -> 'coarse_logits'
               (fgjax.models.bap: the BAP network's 'classifier');
  mask         one map A_k per image -> learnable deconvolutional up-sampler -> (N, S, S),
               min-max normalised to [0, 1] per image: (u - min u) / max(max u - min u,
               1e-6) (the paper multiplies the image by "the up-sampled attention map"
               without saying how it is scaled; WS-DAN divides its maps by their max,
               which needs u >= 0, which a learnt up-sampler does not guarantee);
  fine pass    the SAME backbone and attention block (the paper shares the feature
               network, section "Setup") on x * mask -> BAP -> 'fine_classifier'
               -> 'fine_logits'.
Loss, eq. (4): L = CE(coarse) + CE(fine) + lambda L_attention: the loss terms 'ce'
(input 'coarse_logits'), 'ce_fine' and 'attention_center' (input 'part_features',
fine_input 'fine_part_features': Algorithm 1 line 12) - configs/cars196_c2f.py.
Nothing stops a gradient between the two passes: the fine loss reaches the up-sampler
and the attention block through the mask (the paper's "differentiable path").

Training draws k uniformly per image (Algorithm 1 line 8) from the 'augment' rng
(fgjax.update); evaluation masks with the mean of all M maps (section "Inference") and
needs no rng. 'logits' is the prediction of config.model.c2f_mode, so every evaluation,
artifact and predict path serves it as it is:
  coarse   'coarse_logits' (the fine pass is never computed under jit);
  fine     'fine_logits';
  average  log((softmax(coarse) + softmax(fine)) / 2): the mean of the two predicted
           distributions (the paper's "average of coarse and fine-grained
           predictions"; log-probabilities are logits whose softmax is that mean).

The up-sampler (section "Pre-training of the deconvolutional network"): `Upsampler`,
ceil(log2(S / H)) stride-2 4x4 transposed convolutions (`Deconv2x`, width
config.model.upsampler_width, ReLU) and a 3x3 convolution to one channel, resized
(bilinear) to S x S where 2^k H overshoots. Its initial parameters are pre-trained on
synthetic pairs when the network is initialised (`pretrain_upsampler`:
config.model.upsampler_pretrain_pairs pairs for upsampler_pretrain_epochs epochs; the
paper: 60,000 pairs, 100 epochs; 0 pairs: random init).

Outputs besides the BAP network's ('attention', 'part_features', 'features',
'embedding' of the coarse pass): 'coarse_logits', 'fine_logits', 'fine_part_features'
(N, M, C), 'mask' (N, S, S), 'logits'. The fine pass needs the image, so the net does
not train on cached backbone outputs (config_checks refuses train.cache_features);
config.model.trainable='head' (frozen backbone, forward 'frozen_bn') works.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fgjax.models import bap
from fgjax.models import cpu_ops
from fgjax.models import nets

MODES = ("coarse", "fine", "average")
# Methods of the synthetic targets (the paper: "bilinear, cubic, and nearest").
INTERPOLATIONS = ("linear", "cubic", "nearest")


class Deconv2x(nn.Module):
  """`nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding='SAME')`, the same
  parameters ('kernel' (4, 4, C_in, C_out), 'bias') and values, computed the sub-pixel
  way: one dense 3x3 convolution on the low-resolution input to 4 C_out channels (one
  group per output phase), interleaved to twice the size.

  Why: XLA:CPU runs the transposed convolution as a convolution over a zero-
  interleaved input, 2.4x slower forward and 2.3x slower with gradients than this
  (the up-sampler of 64 maps 7 -> 224 px, benchmarks/upsampler.py, BENCHMARKS 17);
  `cpu_ops.conv_same` keeps its gradients fast inside the pre-training loop. With
  lax's SAME padding (2, 2) on the dilated input, output row 2m + a reads input rows
  m + a - 1 and m + a through kernel rows a and a + 2; columns likewise.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.ConvTranspose
    k3 = jnp.zeros((3, 3, c, 2, 2, self.features), kernel.dtype)
    for a in (0, 1):
      for b in (0, 1):
        for u in (0, 1):
          for v in (0, 1):
            k3 = k3.at[a + u, b + v, :, a, b].set(kernel[a + 2 * u, b + 2 * v])
    y = cpu_ops.conv_same(x, k3.reshape(3, 3, c, 4 * self.features))
    y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias


class Upsampler(nn.Module):
  """Learnable up-sampler of one attention map: (N, H, W) -> (N, S, S) (module docstring).

  Attributes:
    width: channels of the transposed convolutions.
  """
  width: int = 8

  @nn.compact
  def __call__(self, maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    n, h, w = maps.shape
    stages = max(1, math.ceil(math.log2(max(size[0] / h, size[1] / w))))
    y = maps[..., None]
    for i in range(stages):
      y = nn.relu(Deconv2x(self.width, name=f"deconv{i}")(y))
    # nn.Conv's own gradients: with one output channel they keep their speed in the
    # pre-training loop, and beat cpu_ops.conv_same's (BENCHMARKS 17).
    y = nn.Conv(1, (3, 3), padding="SAME", name="out")(y)[..., 0]
    if y.shape[1:] != tuple(size):
      y = jax.image.resize(y, (n, *size), "linear")
    return y


def synthetic_pairs(key: jax.Array, indices: jax.Array, map_shape: tuple[int, int],
                    size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Pairs `indices` of the synthetic up-sampling data set defined by `key`.

  Pair i: a low-resolution map relu(z) / max relu(z), z ~ N(0, 1) per cell (sparse and
  >= 0 like a ReLU attention map), and its up-sampling to `size` by one of
  INTERPOLATIONS, chosen uniformly. The pair depends only on (key, i), so an epoch
  revisits the same pairs without storing them.

  Returns: (low (B, H, W), high (B, S, S)).
  """
  def one(i):
    k_map, k_method = jax.random.split(jax.random.fold_in(key, i))
    low = jax.nn.relu(jax.random.normal(k_map, map_shape))
    low = low / jnp.maximum(jnp.max(low), 1e-6)
    ups = jnp.stack([jax.image.resize(low, size, m) for m in INTERPOLATIONS])
    return low, ups[jax.random.randint(k_method, (), 0, len(INTERPOLATIONS))]
  return jax.vmap(one)(indices)


def pretrain_upsampler(upsampler: Upsampler, params: Any, key: jax.Array,
                       map_shape: tuple[int, int], size: tuple[int, int],
                       num_pairs: int = 60000, epochs: int = 100, batch_size: int = 64,
                       learning_rate: float = 1e-3) -> tuple[Any, jax.Array]:
  """The paper's pre-training: `epochs` passes of Adam on the L2 loss
  mean (upsampler(low) - high)^2 over `num_pairs` synthetic pairs (`synthetic_pairs`),
  shuffled per epoch, in batches of `batch_size` (the last partial batch dropped).
  One jit-able lax.scan: no per-step Python.

  Returns: (params, (epochs,) mean loss per epoch).
  """
  batch_size = min(int(batch_size), int(num_pairs))
  steps = int(num_pairs) // batch_size
  if steps < 1 or epochs < 1:
    raise ValueError(f"pretrain_upsampler needs num_pairs >= 1 and epochs >= 1, got "
                     f"{num_pairs} and {epochs} (config.model.upsampler_pretrain_*).")
  data_key, shuffle_key = jax.random.split(key)
  tx = optax.adam(learning_rate)

  def loss_fn(p, idx):
    low, high = synthetic_pairs(data_key, idx, map_shape, size)
    return jnp.mean(jnp.square(upsampler.apply({"params": p}, low, size) - high))

  def step(carry, idx):
    p, opt = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, idx)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  def epoch(carry, e):
    order = jax.random.permutation(jax.random.fold_in(shuffle_key, e), num_pairs)
    batches = order[:steps * batch_size].reshape(steps, batch_size)
    carry, losses = jax.lax.scan(step, carry, batches)
    return carry, jnp.mean(losses)

  (params, _), losses = jax.lax.scan(epoch, (params, tx.init(params)),
                                     jnp.arange(int(epochs)))
  return params, losses


class PretrainedUpsampler(nn.Module):
  """`Upsampler` whose parameters ('net') are initialised by `pretrain_upsampler` on maps
  of the shape it is first called with (0 pairs: its random init)."""
  width: int = 8
  pretrain_pairs: int = 0
  pretrain_epochs: int = 1

  @nn.compact
  def __call__(self, maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    net = Upsampler(self.width, parent=None)

    def init(key):
      k_init, k_train = jax.random.split(key)
      params = net.init(k_init, jnp.zeros((1, *maps.shape[1:]), jnp.float32),
                        size)["params"]
      if self.pretrain_pairs and self.pretrain_epochs:
        params = pretrain_upsampler(net, params, k_train, tuple(maps.shape[1:]), size,
                                    self.pretrain_pairs, self.pretrain_epochs)[0]
      return params

    return net.apply({"params": self.param("net", init)}, maps, size)


def unit_range(u: jax.Array) -> jax.Array:
  """Per image min-max normalisation of (N, S, S) to [0, 1] (module docstring)."""
  lo = jnp.min(u, axis=(1, 2), keepdims=True)
  span = jnp.max(u, axis=(1, 2), keepdims=True) - lo
  return (u - lo) / jnp.maximum(span, 1e-6)


def average_predictions(a: jax.Array, b: jax.Array) -> jax.Array:
  """log((softmax(a) + softmax(b)) / 2), stably, with ops every engine serves."""
  la, lb = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
  top = jnp.maximum(la, lb)
  return top + jnp.log(0.5 * (jnp.exp(la - top) + jnp.exp(lb - top)))


@nets.register("c2f")
class Coarse2FineNet(bap.BAPNet):
  """Coarse2Fine (module docstring); the coarse pass is BAPNet's (without crop/drop).

  Attributes (besides BAPNet's):
    upsampler: a PretrainedUpsampler ('upsampler' parameter group).
    fine_classifier: Dense(C) of the fine pass ('fine_classifier').
    mode: config.model.c2f_mode, which prediction 'logits' is.
  """
  upsampler: Optional[nn.Module] = None
  fine_classifier: Optional[nn.Module] = None
  mode: str = "average"

  # The up-sampler and fine head init on an image (Network.init): their shapes depend
  # on the input size.
  trunk_init_methods = ("init_all",)

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    mode = model_config.get("c2f_mode", "average")
    if mode not in MODES:
      raise ValueError(f"config.model.c2f_mode={mode!r} is unknown; use one of "
                       f"{', '.join(MODES)}.")
    if model_config.get("attention_crop_drop"):
      raise ValueError("config.model.attention_crop_drop is WS-DAN's augmentation of net "
                       "'bap'; net 'c2f' masks with its up-sampler instead: set it False.")
    width = int(model_config.get("upsampler_width", 8))
    pairs = int(model_config.get("upsampler_pretrain_pairs", 0))
    epochs = int(model_config.get("upsampler_pretrain_epochs", 1))
    if width < 1 or pairs < 0 or epochs < 0:
      raise ValueError(f"config.model.upsampler_width={width} must be >= 1 and "
                       f"upsampler_pretrain_pairs={pairs} / _epochs={epochs} >= 0.")
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes), mode=mode,
               upsampler=PretrainedUpsampler(width, pairs, epochs),
               fine_classifier=nn.Dense(int(num_classes)),
               **cls.bap_fields(spec, model_config))

  def init_all(self, x: jax.Array) -> dict[str, jax.Array]:
    return self(x, train=False)

  def __call__(self, x, train=False, backbone_train=None):
    bt = train if backbone_train is None else backbone_train
    out = dict(self.trunk(x, train=bt))
    out.update(self.head(out, train=train))
    out["mean_map"] = jnp.mean(out["map"], axis=-1)
    attention = out["attention"]
    if train:  # Algorithm 1 line 8: one map per image, uniformly.
      k = jax.random.randint(self.make_rng("augment"), (x.shape[0],), 0,
                             attention.shape[-1])
      chosen = jnp.moveaxis(attention, -1, 1)[jnp.arange(x.shape[0]), k]
    else:  # Section "Inference": the mean of all maps.
      chosen = jnp.mean(attention, axis=-1)
    mask = unit_range(self.upsampler(chosen, tuple(x.shape[1:3])))
    fine = self.attend(self.backbone(x * mask[..., None], train=bt)["map"], train)
    out.update(coarse_logits=out["logits"], mask=mask,
               fine_part_features=fine["part_features"],
               fine_logits=self.fine_classifier(fine["features"]))
    out["logits"] = {"coarse": out["coarse_logits"], "fine": out["fine_logits"],
                     "average": average_predictions(out["coarse_logits"],
                                                    out["fine_logits"])}[self.mode]
    return out
