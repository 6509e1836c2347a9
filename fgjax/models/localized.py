"""ELoPE's localization module as a registered network ('elope_localized').

Hanselmann & Ney, ELoPE (WACV 2020), section 5 and Fig. 3. A lightweight module
predicts the heat map that the trained classifier's last conv map would give (its
channel mean), from a 64 x 64 resize of the image; the min-max normalised prediction,
thresholded at tau, gives the box; the image is cropped to the box, resized, and
classified by the backbone and the ELoPE head (pooling -> embedding -> classifier): one
pass of the full backbone per image.

The module is "the first few layers" of the backbone up to `localizer_stop`, initialised
from the trained classifier (ResNet-50: stem and first residual stage, about 220k
parameters, tested; EfficientNet-Lite0: stem, stage1 and stage2, 15,792), followed by a
1x1 convolution to one channel ('localizer_head') and an antialiased resize to
`localizer_map_size` squared cells (the size of the classifier's map: 7 for Lite0 at
224 px, 14 for ResNet-50 at 448 px). Its BatchNorm always uses the statistics copied
from the classifier: batches of a few images would make poor statistics for it.

Outputs, besides those of the ELoPE network on the crop ('features', 'embedding',
'logits' and the backbone outputs):
  'heatmap'         (N, m, m)  the module's prediction;
  'box'             (N, 4)     its box, normalised (ymin, xmin, ymax, xmax);
  'heatmap_target'  (N, I, J)  the channel mean of the backbone's map of the uncropped
                               image, without gradient: the module's training target
                               (loss term 'heatmap', smooth L1), and the classifier's
                               own mean-map localization (ELoPE Table 4).
Under jax.jit only what is read runs: training the module reads 'heatmap' and
'heatmap_target' (no crop pass); classifying reads 'logits' (no uncropped pass).
Training recipes (configs/*_elope.py): the ELoPE classifier first; then this network
with `config.init_from` = that run, only 'localizer' and 'localizer_head' trainable
(config.model.trainable='head', config.model.frozen='embed,classifier', plus 'pool' with
weighted_kmax) and the 'heatmap' loss term; then, optionally, the head again on the
crops.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax

from fgjax.models import localize
from fgjax.models import nets


@nets.register("elope_localized")
class LocalizedNet(nets.ELoPENet):
  """The ELoPE network behind the localization module (module docstring).

  Attributes (besides ELoPENet's):
    localizer: a copy of the backbone module, run up to `localizer_stop`.
    localizer_head: the 1x1 convolution to one channel (a Dense over channels).
    localizer_stop: the backbone output the module ends with.
    localizer_size: side of the module's input resize (64 in the paper).
    localizer_map_size: side of the predicted heat map.
    tau: box threshold on the min-max normalised heat map (ELoPE Table 2: 0.3 for
      birds, 0.2 otherwise).
  """
  localizer: nn.Module = None
  localizer_head: nn.Module = None
  localizer_stop: str = "stage2"
  localizer_size: int = 64
  localizer_map_size: int = 7
  tau: float = 0.2

  trunk_init_methods: ClassVar[tuple[str, ...]] = ("localize",)
  trunk_groups: ClassVar[tuple[str, ...]] = ("backbone", "localizer", "localizer_head")

  @classmethod
  def create(cls, spec, pool, model_config, num_classes):
    return cls(backbone=spec.module, pool=pool, num_classes=int(num_classes),
               embed_dim=int(model_config.embed_dim), localizer=spec.module.clone(),
               localizer_head=nn.Dense(1),
               localizer_stop=model_config.localizer_stop,
               localizer_size=int(model_config.localizer_size),
               localizer_map_size=int(model_config.localizer_map_size),
               tau=float(model_config.localizer_tau))

  @staticmethod
  def trunk_config(model_config):
    return {**nets.PooledNet.trunk_config(model_config),
            **{k: model_config[k] for k in ("localizer_stop", "localizer_size",
                                            "localizer_map_size", "localizer_tau")}}

  @staticmethod
  def complete(variables: dict[str, Any], loaded: set[str]) -> dict[str, Any]:
    """The module's backbone blocks copied from the (trained) backbone, unless they were
    loaded themselves: "initialized from the trained classification model"."""
    if "localizer" in loaded:
      return variables
    out = {}
    for collection, tree in variables.items():
      tree = dict(tree)
      if "localizer" in tree:
        tree["localizer"] = {k: tree["backbone"][k] for k in tree["localizer"]}
      out[collection] = tree
    return out

  def localize(self, x: jax.Array) -> jax.Array:
    """(N, H, W, 3) normalised images -> (N, m, m) predicted heat maps."""
    n, _, _, c = x.shape
    small = jax.image.resize(x, (n, self.localizer_size, self.localizer_size, c),
                             "linear", antialias=True)
    feats = self.localizer(small, train=False, stop=self.localizer_stop)
    heat = self.localizer_head(feats[self.localizer_stop])[..., 0]
    m = self.localizer_map_size
    return jax.image.resize(heat, (n, m, m), "linear", antialias=True)

  def trunk(self, x, train=False):
    heat = self.localize(x)
    box = jax.lax.stop_gradient(localize.heatmap_boxes(heat, self.tau))
    crop = localize.crop_and_resize(x, box, x.shape[1:3])
    return {**self.backbone(crop, train=train), "heatmap": heat, "box": box}

  def __call__(self, x, train=False, backbone_train=None):
    out = super().__call__(x, train=train, backbone_train=backbone_train)
    full_map = self.backbone(x, train=False)["map"]
    out["heatmap_target"] = jax.lax.stop_gradient(
        localize.channel_mean_heatmap(full_map))
    return out
