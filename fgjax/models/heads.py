"""Embedding and classifier heads on top of a backbone (impostor paper, protocol step 1).

The paper keeps the ImageNet backbone and *replaces* its last fully-connected layer:
with `embed_dim` outputs for impostor networks ("If the desired embedding
dimensionality d_em does not equal d_fc, we change the size of the last fully-connected
layer to be d_fc x d_em, and initialize it by a random matrix"), or with `num_classes`
outputs for the ConvNet baseline. ConvNet-extra inserts one more d_em layer before the
classifier (section 4, "Compared approaches", item 2).
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

# Name of the layer whose kernel and bias protocol step 3 divides by the mean impostor
# norm; the trainer looks it up by this name.
EMBED_LAYER = "embed"
CLASSIFIER_LAYER = "classifier"


class ImpostorNet(nn.Module):
  """Backbone + optional embedding layer + optional softmax classifier.

  Attributes:
    backbone: a module mapping normalised NHWC images to pooled features (N, F), called
      as `backbone(x, train=...)`.
    embed_dim: width d_em of the embedding layer that replaces the backbone's last FC;
      None uses the pooled features themselves as the embedding.
    num_classes: width of a softmax classifier on top of the embedding (ConvNet and
      ConvNet-extra schemes); None for impostor networks, which classify with the RBF
      rule over impostors instead.
    extra_relu: apply ReLU between the embedding layer and the classifier. Without a
      non-linearity ConvNet-extra would collapse to a low-rank linear classifier, which
      is not the "extra fully-connected layer" the paper compares against.
  """
  backbone: nn.Module
  embed_dim: Optional[int] = None
  num_classes: Optional[int] = None
  extra_relu: bool = True

  def setup(self):
    self.embed = (nn.Dense(self.embed_dim, name=EMBED_LAYER)
                  if self.embed_dim is not None else None)
    self.classifier = (nn.Dense(self.num_classes, name=CLASSIFIER_LAYER)
                       if self.num_classes is not None else None)

  def __call__(self, x: jnp.ndarray, train: bool = False,
               backbone_train: Optional[bool] = None) -> dict[str, jnp.ndarray]:
    """Returns {'features': (N, F), 'embedding': (N, E), 'logits': (N, C) if classifier}.

    `backbone_train` lets the trainer keep a frozen backbone's BatchNorm on running
    statistics while the heads train; it defaults to `train`.
    """
    if backbone_train is None:
      backbone_train = train
    return self.heads(self.backbone(x, train=backbone_train))

  def heads(self, features: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The layers after the backbone, from pooled features (N, F).

    Exposed separately so that head-only training on a CPU budget can run on cached
    backbone features (`net.apply(variables, features, method=ImpostorNet.heads)`).
    """
    out = {"features": features}
    embedding = features if self.embed is None else self.embed(features)
    out["embedding"] = embedding
    if self.classifier is not None:
      h = embedding
      if self.embed is not None and self.extra_relu:
        h = nn.relu(h)
      out["logits"] = self.classifier(h)
    return out
