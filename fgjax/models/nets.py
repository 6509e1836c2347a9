"""Networks by name: a backbone, a pooling and heads, returning a documented outputs dict.

`build(model_config, num_classes)` is the one factory: training, the artifact, predict
and the CPU engines all rebuild a network through it. A network module is called as

  outputs = net.apply(variables, images, train=False, backbone_train=None)

and returns every backbone output (fgjax.models.segments: 'stem', 'stage1'..,
'map', 'pooled') plus its own:
  'mean_map'   (N, I, J) the channel mean of 'map', ELoPE's heat map of the object,
  'features'   (N, F)  the pooling's result (`config.model.pooling`),
  'embedding'  (N, E)  what the RBF rule and the embedding losses read,
  'logits'     (N, C)  softmax classifier (networks with `has_logits`).
Under jax.jit, outputs nobody reads are never computed.

`net.apply(variables, x, method='trunk')` runs everything before the head (the
backbone; for the localized network also the box and crop) and
`Network.head_apply(variables, trunk_outputs)` only the layers after it, from a dict
holding the trunk outputs in `Network.reads`: head-only training runs the trunk once per
image and the head on its cached outputs. With `build(..., cached_tail=N)` the cut moves
down into the backbone: the cached output is the one before the last N parameter
groups (fgjax.models.segments.tail_start), and the head runs those groups first.

Registered networks (impostor paper, section 4, "Compared approaches"; protocol step 1
replaces the backbone's last fully-connected layer):
  convnet        pooling -> Dense(C) ('classifier'); embedding = features (ConvNet).
  convnet_extra  pooling -> Dense(d_em) ('embed') -> ReLU -> Dense(C) (ConvNet-extra).
  elope          pooling -> Dense(d_em) ('embed') -> Dense(C): ELoPE's embedding layer
                 (section 4), trained with the 'elope' loss term.
  impostor       pooling -> Dense(d_em) ('embed'); no classifier: the RBF rule over
                 impostors classifies (eq. 3).
A new network is one `@register`ed module class plus its test.
"""

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax import registries
from fgjax.models import pooling as pooling_lib
from fgjax.models import registry
from fgjax.models import segments

NETWORKS = registries.Registry("network", "config.model.net", name_attr="registered_name")
register = NETWORKS.register
names = NETWORKS.names


class PooledNet(nn.Module):
  """Backbone -> pooling -> `head_from_features`; subclasses define the heads.

  Attributes:
    backbone: a registry backbone (called as backbone(x, train=...), returns a dict).
    pool: a fgjax.models.pooling module; it reads backbone output `pool.reads`.
    num_classes: C, the width of 'logits' (networks with a classifier).
    embed_dim: d_em, the width of the embedding layer (networks with one).
  """
  backbone: nn.Module
  pool: nn.Module
  num_classes: Optional[int] = None
  embed_dim: Optional[int] = None

  # Class-level facts about the network, read by the factory and the impostor policies.
  has_logits: ClassVar[bool] = False
  # The Dense that protocol step 3 rescales.
  embedding_layer: ClassVar[Optional[str]] = None
  # Trunk methods that own params besides the backbone (Network.init runs them once).
  trunk_init_methods: ClassVar[tuple[str, ...]] = ()
  # The parameter groups the trunk uses: frozen when its outputs are cached.
  trunk_groups: ClassVar[tuple[str, ...]] = ("backbone",)

  @classmethod
  def create(cls, spec, pool: nn.Module, model_config: Any, num_classes: int):
    """The module for `model_config`; subclasses with more attributes read them here."""
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes),
               embed_dim=int(model_config.embed_dim) if cls.embedding_layer else None)

  @staticmethod
  def extra_reads(model_config: Any) -> tuple[str, ...]:
    """Backbone outputs the head reads besides the pooling's (cached head-only)."""
    del model_config
    return ()

  @staticmethod
  def trunk_config(model_config: Any) -> dict[str, Any]:
    """The config fields that decide `trunk`'s outputs (they key the feature cache)."""
    return {"backbone": model_config.backbone,
            "pretrained": bool(model_config.pretrained)}

  @staticmethod
  def complete(variables: dict[str, Any], loaded: set[str]) -> dict[str, Any]:
    """Variables with parameter groups derived from others filled in; `loaded` names
    the groups that came from elsewhere (config.init_from). Nothing to derive here."""
    del loaded
    return variables

  def __call__(self, x: jax.Array, train: bool = False,
               backbone_train: Optional[bool] = None) -> dict[str, jax.Array]:
    """`backbone_train` keeps a frozen backbone's BatchNorm on running statistics while
    the heads train; it defaults to `train`."""
    out = dict(self.trunk(x, train=train if backbone_train is None else backbone_train))
    out.update(self.head(out, train=train))
    # ELoPE section 5 / Fig. 2: the channel mean of the last conv map is a heat map of
    # the object (computed only where read, e.g. by the localization evaluation).
    out["mean_map"] = jnp.mean(out["map"], axis=-1)
    return out

  def trunk(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Everything before the head: here the backbone's outputs."""
    return self.backbone(x, train=train)

  def cached_head(self, cached: dict[str, jax.Array], train: bool = False,
                  start: Optional[str] = None) -> dict[str, jax.Array]:
    """`head` on cached trunk outputs. With `start`, the backbone's segments after
    output `start` run first, their BatchNorm on running statistics: what the
    uncached 'frozen_bn' forward of a partly trainable backbone does."""
    outputs = dict(cached)
    if start is not None:
      outputs.update(self.backbone(cached[start], train=False, start=start))
    return self.head(outputs, train=train)

  def head(self, backbone_outputs: dict[str, jax.Array],
           train: bool = False) -> dict[str, jax.Array]:
    """The layers after the backbone, from a dict of backbone outputs."""
    del train  # The registered heads behave the same in both modes.
    features = self.pool(backbone_outputs[self.pool.reads])
    return {"features": features, **self.head_from_features(features)}

  def head_from_features(self, features: jax.Array) -> dict[str, jax.Array]:
    raise NotImplementedError


@register("convnet")
class ConvNet(PooledNet):
  """ConvNet baseline: a softmax classifier on the pooled features (embedding = features)."""
  has_logits = True

  @nn.compact
  def head_from_features(self, features):
    return {"embedding": features,
            "logits": nn.Dense(self.num_classes, name="classifier")(features)}


class ExitHeads(nn.Module):
  """Softmax exit heads (Savchenko 2021, "fine-tuned (all heads)"): per stage global
  average pooling, l2-normalisation (pooling.exit_features, the exit branch) and a
  Dense(C) 'exit_<stage>' on `scale` times the unit feature. Returns (N, M, C) logits.

  Unit features bound a logit by its weight row's norm, which starts near 1 and grows
  slowly, so without the scale the heads stay unconfident for many steps; 16 is the
  scale of normalised-softmax heads (and ELoPE's gamma)."""
  stages: tuple[str, ...]
  num_classes: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, backbone_outputs: dict[str, jax.Array]) -> jax.Array:
    return jnp.stack([nn.Dense(self.num_classes, name=f"exit_{s}")(
        self.scale * pooling_lib.exit_features(backbone_outputs[s]))
                      for s in self.stages], axis=1)


@register("convnet_exits")
class ConvNetExits(ConvNet):
  """ConvNet with a softmax head on each of config.model.exit_stages as well: outputs
  'exit_logits' (N, M, C), trained with the rest by the 'exit_ce' loss term - the
  paper's optional step 1 ("add fully-connected LR classifiers to all M branches and
  fine-tune the CNN"). The sequential exits are fitted afterwards on the fine-tuned
  features as for any network (config.early_exit)."""
  exit_heads: Optional[nn.Module] = None

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    stages = tuple(model_config.get("exit_stages") or ())
    if not stages:
      raise ValueError("net 'convnet_exits' needs config.model.exit_stages, e.g. "
                       "('stage4', 'stage6', 'map') (usually config.early_exit.exits).")
    unknown = [s for s in stages if s not in spec.outputs]
    if unknown:
      raise ValueError(f"config.model.exit_stages names {unknown}, not outputs of the "
                       f"backbone; its outputs are {', '.join(spec.outputs)}.")
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes),
               exit_heads=ExitHeads(stages, int(num_classes)))

  @staticmethod
  def extra_reads(model_config: Any) -> tuple[str, ...]:
    return tuple(model_config.get("exit_stages") or ())

  def head(self, backbone_outputs, train=False):
    out = super().head(backbone_outputs, train)
    out["exit_logits"] = self.exit_heads(backbone_outputs)
    return out


@register("convnet_extra")
class ConvNetExtra(PooledNet):
  """ConvNet-extra: a d_em layer, ReLU, then the classifier.

  Without the non-linearity it would collapse to a low-rank linear classifier, which is
  not the "extra fully-connected layer" the paper compares against.
  """
  has_logits = True
  embedding_layer = "embed"

  @nn.compact
  def head_from_features(self, features):
    embedding = nn.Dense(self.embed_dim, name="embed")(features)
    logits = nn.Dense(self.num_classes, name="classifier")(nn.relu(embedding))
    return {"embedding": embedding, "logits": logits}


@register("elope")
class ELoPENet(PooledNet):
  """ELoPE, section 4: pooling -> embedding layer (Dense d_em) -> classifier.

  The embedding layer sits between the pooling and the classification layer; ELoPE's
  L_e (loss term 'elope') shapes it, cross-entropy trains the classifier on it. The
  paper's baselines "include a fully connected layer with dimension 512 before the
  classification layer" (section 6.3) and name no non-linearity between the two, so
  there is none here (ConvNet-extra puts a ReLU there).
  """
  has_logits = True
  embedding_layer = "embed"

  @nn.compact
  def head_from_features(self, features):
    embedding = nn.Dense(self.embed_dim, name="embed")(features)
    return {"embedding": embedding,
            "logits": nn.Dense(self.num_classes, name="classifier")(embedding)}


@register("impostor")
class ImpostorNet(PooledNet):
  """Impostor network: the d_em embedding layer only (eq. 1); eq. 3 classifies."""
  embedding_layer = "embed"

  @nn.compact
  def head_from_features(self, features):
    return {"embedding": nn.Dense(self.embed_dim, name="embed")(features)}


@dataclasses.dataclass(frozen=True)
class Network:
  """A built network and what its users need to know about it.

  Attributes:
    name: registry name (config.model.net).
    module: the flax network (see the module docstring for its outputs).
    spec: the backbone's registry spec; spec.variables are the initial (pretrained)
      backbone variables.
    reads: backbone outputs the head reads (what a head-only run caches).
    cache_from: None, or the backbone output after which `head_apply` runs the
      backbone's trainable tail (build's `cached_tail`).
    has_logits: whether outputs hold 'logits'.
    embedding_layer: name of the Dense that protocol step 3 rescales, or None.
    trunk_config: the config fields that decide the trunk's outputs.
    trunk_groups: the parameter groups the trunk uses.
  """
  name: str
  module: nn.Module
  spec: registry.ModelSpec
  reads: tuple[str, ...]
  has_logits: bool
  embedding_layer: Optional[str]
  trunk_config: dict[str, Any]
  trunk_groups: tuple[str, ...]
  cache_from: Optional[str] = None

  def head_apply(self, variables: dict[str, Any], cached: dict[str, jax.Array],
                 train: bool = False, **kwargs) -> dict[str, jax.Array]:
    """The network's outputs after its cached trunk outputs `cached` ({read: array});
    kwargs go to `module.apply` (e.g. rngs)."""
    return self.module.apply(variables, cached, train=train, start=self.cache_from,
                             method="cached_head", **kwargs)

  def init(self, seed: int, image_size: int) -> dict[str, Any]:
    """{'params', 'batch_stats'}: the backbone's variables plus freshly drawn heads.

    Only the heads are initialised here (on backbone output shapes from
    jax.eval_shape), so no backbone init is compiled; flax draws each head layer's
    values from the seed and the layer's name, as a whole-network init would.
    """
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda v, x: self.spec.module.apply(v, x, train=False), self.spec.variables,
        dummy)
    feats = {k: jnp.zeros(shapes[k].shape, shapes[k].dtype) for k in self.reads}
    # With cache_from this also draws the backbone's tail; the pretrained
    # backbone variables replace it below.
    heads = dict(jax.jit(lambda r: self.module.init(
        r, feats, start=self.cache_from, method="cached_head"))(jax.random.key(seed)))
    # Layers of the trunk besides the backbone (a localization module) init on images.
    for method in self.module.trunk_init_methods:
      image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
      extra = jax.jit(lambda r: self.module.init(r, image, method=method))(
          jax.random.key(seed))
      heads = {c: {**heads.get(c, {}), **extra.get(c, {})} for c in {*heads, *extra}}
    params = {**heads["params"], "backbone": self.spec.variables["params"]}
    out = {"params": params}
    stats = dict(heads.get("batch_stats", {}))
    if self.spec.variables.get("batch_stats"):
      stats["backbone"] = self.spec.variables["batch_stats"]
    if stats:
      out["batch_stats"] = stats
    return self.module.complete(out, loaded=set())

  def output_shapes(self, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of every output for one image of `image_size`, without computing any."""
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: self.init(0, image_size))
    return jax.eval_shape(lambda v, x: self.module.apply(v, x, train=False), variables,
                          dummy)

  def scale_embedding(self, params: dict[str, Any], factor: Any) -> dict[str, Any]:
    """params with the embedding layer's kernel and bias multiplied by `factor`."""
    if self.embedding_layer is None:
      raise ValueError(f"network {self.name!r} has no embedding layer to rescale; "
                       "impostor schemes need one (config.model.net='impostor').")
    layer = {k: v * factor for k, v in params[self.embedding_layer].items()}
    return {**params, self.embedding_layer: layer}


def build(model_config: Any, num_classes: int, *, pretrained: Optional[bool] = None,
          net: Optional[str] = None, cached_tail: int = 0) -> Network:
  """The network of `model_config` (config.model) for `num_classes` classes.

  Args:
    model_config: fields backbone, pretrained, weights_path, net, pooling,
      pooling_<option> (options of the pooling, e.g. pooling_k), embed_dim.
    num_classes: C.
    pretrained: overrides model_config.pretrained (an artifact loads its own weights).
    net: overrides model_config.net (a scheme preset names its network).
    cached_tail: N > 0: the last N backbone parameter groups train on cached outputs
      (config.model.trainable='last:N' with config.train.cache_features), so `reads`
      is the backbone output before them (plus any earlier output the head reads).
  """
  name = net or model_config.get("net", "")
  cls = NETWORKS.get(name)
  pool_name = model_config.get("pooling", "avg")
  # A pooling's option `o` comes from config.model.pooling_<o> (e.g. pooling_k).
  options = {o: model_config.get(f"pooling_{o}") for o in pooling_lib.options(pool_name)
             if model_config.get(f"pooling_{o}") is not None}
  pool = pooling_lib.make(pool_name, **options)
  use_weights = model_config.pretrained if pretrained is None else pretrained
  spec = registry.get(model_config.backbone, pretrained=bool(use_weights),
                      weights_path=(model_config.get("weights_path") or None)
                      if use_weights else None)
  reads = tuple(dict.fromkeys((pool.reads,) + cls.extra_reads(model_config)))
  cache_from = None
  if cached_tail:
    groups = segments.output_groups(spec.module, spec.outputs, spec.input_size)
    cache_from = segments.tail_start(groups, spec.blocks, cached_tail)
    before = spec.outputs[:spec.outputs.index(cache_from)]
    reads = tuple(r for r in reads if r in before) + (cache_from,)
  return Network(name=name, module=cls.create(spec, pool, model_config, num_classes),
                 spec=spec, reads=reads,
                 has_logits=cls.has_logits,
                 embedding_layer=cls.embedding_layer,
                 trunk_config=cls.trunk_config(model_config),
                 trunk_groups=cls.trunk_groups, cache_from=cache_from)

