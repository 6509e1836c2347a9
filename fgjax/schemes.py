"""The five training schemes of the impostor paper (section 4, "Compared approaches").

Schemes differ only in (a) which heads the network has, (b) how the loss is assembled
and (c) whether the impostor centers are optimised, reset, or frozen. They share one
training loop (fgjax.train).

| scheme   | heads                    | loss                                    | impostors |
|----------|--------------------------|-----------------------------------------|-----------|
| ce       | classifier               | cross-entropy                           | none      |
| ce_extra | d_em FC + classifier     | cross-entropy                           | none      |
| tied     | d_em FC                  | NCA, eq. (4)                            | reset to the current embeddings every N epochs (eq. 5, relaxed as in Movshovitz-Attias et al.) |
| fixed    | d_em FC                  | NCA, eq. (4)                            | frozen at the pretrained network's embeddings |
| loose    | d_em FC                  | NCA + lambda * attachment, eq. (6)      | optimised jointly |

Any scheme can add an auxiliary class-mean loss on its embedding (`AuxLoss`,
config.aux_loss): the center loss of Wen et al. 2016 or ELoPE's L_e (Simon et al. 2020).
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from fgjax import losses
from fgjax.impostors import ImpostorSet

NAMES = ("ce", "ce_extra", "tied", "fixed", "loose")
AUX_NAMES = ("none", "center", "elope")


@dataclasses.dataclass(frozen=True)
class Scheme:
  """What a scheme needs from the network, the loss and the optimiser."""
  name: str
  embed_dim: Optional[int]         # None: embedding = pooled backbone features
  has_classifier: bool             # softmax head trained with cross-entropy
  uses_impostors: bool             # NCA loss against an impostor set
  train_impostors: bool            # impostor centers are optimiser leaves
  attachment_weight: float = 0.0   # lambda of eq. (6)
  reset_every_epochs: int = 0      # tied scheme: impostor reset period (0 = never)


def get(config) -> Scheme:
  """Builds the Scheme named by `config.scheme` from the config."""
  name = config.scheme
  embed_dim = int(config.model.embed_dim)
  if name == "ce":
    return Scheme(name, embed_dim=None, has_classifier=True, uses_impostors=False,
                  train_impostors=False)
  if name == "ce_extra":
    return Scheme(name, embed_dim=embed_dim, has_classifier=True,
                  uses_impostors=False, train_impostors=False)
  if name == "tied":
    return Scheme(name, embed_dim=embed_dim, has_classifier=False,
                  uses_impostors=True, train_impostors=False,
                  reset_every_epochs=int(config.impostors.reset_every_epochs))
  if name == "fixed":
    return Scheme(name, embed_dim=embed_dim, has_classifier=False,
                  uses_impostors=True, train_impostors=False)
  if name == "loose":
    return Scheme(name, embed_dim=embed_dim, has_classifier=False,
                  uses_impostors=True, train_impostors=True,
                  attachment_weight=float(config.impostors.attachment_weight))
  raise ValueError(f"config.scheme={name!r} is not a scheme; use one of {NAMES}.")


@dataclasses.dataclass(frozen=True)
class AuxLoss:
  """An auxiliary loss on the embedding against per-class means kept in the state.

  The total loss is scheme loss + weight * aux, as ELoPE eq. (1), L = L_CE + lambda L_e.
  """
  name: str             # 'center' (Wen et al. 2016) | 'elope' (ELoPE eq. 5-10)
  weight: float         # lambda of ELoPE eq. (1)
  alpha: float          # class-mean update rate, ELoPE eq. (6) / Wen et al. eq. (4)
  gamma: float = 0.0    # ELoPE eq. (10): weight of the between-class term
  margin: float = 0.0   # ELoPE eq. (10): m, on squared distances between means
  normalize: bool = True  # l2-normalise the embedding first (ELoPE Sec. 4.1)


def get_aux_loss(config) -> Optional[AuxLoss]:
  """The AuxLoss of `config.aux_loss`, or None when it is off (name 'none')."""
  c = config.get("aux_loss")
  if c is None or c.name == "none":
    return None
  return AuxLoss(c.name, weight=float(c.weight), alpha=float(c.alpha),
                 gamma=float(c.gamma), margin=float(c.margin),
                 normalize=bool(c.normalize))


def aux_loss_and_means(aux: AuxLoss, embedding: jax.Array, batch: dict[str, jax.Array],
                       means: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unweighted auxiliary loss of a batch and the class means for the next step.

  f_n = embedding_n (divided by its norm when `aux.normalize`). Padding rows
  (batch['valid'] False) weigh zero in the loss and in the means update.

  * center: mean_n 0.5 ||f_n - mu_{y_n}||^2 over valid rows (Wen et al. eq. 2, averaged
    so `weight` does not depend on the batch size) with the means held constant, then
    Wen et al.'s separate update mu <- mu - alpha * Delta mu (their eq. 4, the same
    rule as ELoPE eq. 6-8; it sees the features without gradient).
  * elope: L_e = L_w + L_b of ELoPE eq. (5), (9), (10); the means are updated first
    with the batch (eq. 6) and the loss differentiates through that update.

  Args:
    embedding: (B, E) the network's embedding.
    batch: {'label': (B,) int, 'valid': (B,) bool}.
    means: (C, E) float class means from the state.

  Returns:
    (aux, new_means): a scalar and (C, E) means without gradient.
  """
  labels = batch["label"]
  weights = batch["valid"].astype(jnp.float32)
  f = embedding.astype(jnp.float32)
  if aux.normalize:
    # rsqrt of a clamped square norm: finite value and gradient at f = 0.
    f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(f), -1, keepdims=True),
                                      1e-12))
  if aux.name == "center":
    per_example = losses.center_loss(f, labels, jax.lax.stop_gradient(means))
    loss = (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    new_means = losses.update_class_means(means, jax.lax.stop_gradient(f), labels,
                                          aux.alpha, weights)
    return loss, new_means
  if aux.name == "elope":
    return losses.elope_loss(f, labels, means, aux.alpha, aux.gamma, aux.margin,
                             weights)
  raise ValueError(f"config.aux_loss.name={aux.name!r} is unknown; use one of "
                   f"{', '.join(AUX_NAMES)}.")


def loss_and_metrics(scheme: Scheme, outputs: dict[str, jax.Array],
                     batch: dict[str, jax.Array], impostors: Optional[ImpostorSet],
                     sigma: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean training loss of a batch for `scheme`, and metrics to log.

  Args:
    outputs: the network's outputs, {'embedding': (B, E), 'logits': (B, C)?}.
    batch: {'label': (B,) int, 'index': (B,) int (row of the example's own impostor),
      'valid': (B,) bool (padding rows weigh zero)}.
    impostors: the impostor set (M, E) for impostor schemes, else None.
    sigma: RBF kernel width of eq. (2).
  """
  labels = batch["label"]
  weights = batch["valid"].astype(jnp.float32)
  denom = jnp.maximum(weights.sum(), 1.0)
  metrics = {}
  if scheme.has_classifier:
    logits = outputs["logits"]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = (per_example * weights).sum() / denom
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    metrics["train_accuracy"] = (correct * weights).sum() / denom
  else:
    embedding = outputs["embedding"]
    # Eq. (4): every training image bypasses its own impostor (j != i).
    per_example = losses.nca_loss(embedding, labels, impostors.centers,
                                  impostors.labels, sigma, exclude=batch["index"])
    nca = (per_example * weights).sum() / denom
    metrics["nca_loss"] = nca
    loss = nca
    if scheme.attachment_weight:
      own = jnp.take(impostors.centers, batch["index"], axis=0)
      attach = losses.attachment_loss(embedding, own)
      attach = (attach * weights).sum() / denom
      metrics["attachment_loss"] = attach
      loss = loss + scheme.attachment_weight * attach
  metrics["loss"] = loss
  return loss, metrics


def describe(scheme: Scheme) -> dict[str, Any]:
  """A JSON-friendly description for results.json."""
  return dataclasses.asdict(scheme)
