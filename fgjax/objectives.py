"""Loss terms by name: the training loss is a weighted sum of terms over named outputs.

  objective = objectives.build(('nca', 'attachment'), config.loss)
  loss, new_loss_state, metrics = objective(outputs, batch, impostors, loss_state)

Each term is a pure function of the network's outputs dict (it reads
`outputs[term.input]`), the batch ({'label', 'index', 'valid'}, plus the fields the
impostor policy adds, `Policy.extend_batch`: a term names those it reads in
`reads_batch_fields`), the impostor set (terms
that use one) and its own state, which lives in `TrainState.loss_state[term.name]`
(class means, feature centers): checkpointed with the rest, initialised by
`init_state`, replaced every step by the term's own update rule. Every term returns its
UNWEIGHTED mean over the valid rows (batch['valid'] False = padding, weight 0);
the objective adds weight * term in the order given and logs '<name>_loss' per term.

Registered terms, each configured by `config.loss.<name>` (weight, input, options):
  ce          softmax cross-entropy on 'logits'; logs train_accuracy.
  ce_fine, ce_crop, ce_drop
              the same on a second head's logits: Coarse2Fine's fine pass
              ('fine_logits', eq. 4), WS-DAN's attention crop / drop ('crop_logits',
              'drop_logits'); log train_<fine|crop|drop>_accuracy.
  exit_ce     the mean cross-entropy of the exit heads' 'exit_logits' (N, M, C) (net
              convnet_exits; sequential early exit's fine-tuning with all heads).
  nca         NCA loss over all impostors, impostor paper eq. (4); each training image
              bypasses its own impostor (j != i, batch['index']). Option sigma (eq. 2).
              Where the impostor policy puts neighbour lists into the batch
              (batch['neighbors'] (N, k), policies knn / knn_loose), the loss runs over
              those k impostors only (fgjax.losses.knn_nca_loss, NNGK review eq. 6-7).
  attachment  ||f(x_i) - c_i||^2 to the image's own impostor, eq. (6); its weight is
              the lambda of eq. (6).
  center      Wen et al. 2016 eq. (2) against class means updated by their eq. (4).
  elope       ELoPE L_e = L_w + L_b, eq. (5), (9), (10), means by eq. (6)-(8).
  attention_center
              Coarse2Fine eq. (2)-(3) / WS-DAN: part features (N, M, C) against
              per-class part centers moved by beta (fgjax.losses.attention).
  heatmap     ELoPE section 5: smooth L1 of the localization module's heat map against
              the trained classifier's (outputs 'heatmap', 'heatmap_target').
Repeated labels in a batch: the class-mean terms sum every row's contribution to its
class (segment sums, ELoPE eq. 6-8), never last-write-wins.
A new term is one `@register`ed class plus its test.
"""

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fgjax import losses
from fgjax import registries
from fgjax.impostors import ImpostorSet

# A term's name is also its config section, config.loss.<name>.
TERMS = registries.Registry("loss term", "config.loss.terms", name_attr="name")
register = TERMS.register
names = TERMS.names


# The norm below which the losses' features and centers are not scaled up: a zero row
# (the class means and centers start at zero) stays zero.
_UNIT_EPS = 1e-6


def _valid_mean(per_example: jax.Array, weights: jax.Array) -> jax.Array:
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class Term:
  """Base of the registered terms: a weight, the output it reads, and its options.

  Subclasses set `uses_impostors` and implement `__call__`; terms with state also
  implement `init_state`.
  """
  weight: float
  input: str
  name: ClassVar[str]
  uses_impostors: ClassVar[bool] = False
  # Optional batch fields an impostor policy may add that the term uses when present.
  reads_batch_fields: ClassVar[tuple[str, ...]] = ()

  def init_state(self, num_classes: int, input_shape: Sequence[int]) -> Optional[Any]:
    """The term's state for `num_classes` classes and an input of `input_shape`
    (one example, e.g. (E,)); None for stateless terms."""
    del num_classes, input_shape
    return None

  def __call__(self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
               impostors: Optional[ImpostorSet], state: Any
               ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """(unweighted mean loss, new state, extra metrics)."""
    raise NotImplementedError


@register("ce")
@dataclasses.dataclass(frozen=True)
class CrossEntropy(Term):
  """Softmax cross-entropy on outputs[input] (N, C) logits."""
  accuracy_metric: ClassVar[str] = "train_accuracy"

  def __call__(self, outputs, batch, impostors, state):
    logits, labels = outputs[self.input], batch["label"]
    weights = batch["valid"].astype(jnp.float32)
    loss = _valid_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                       weights)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, state, {self.accuracy_metric: _valid_mean(correct, weights)}


# Second heads' cross-entropies are terms of their own (not one term over several
# inputs) so that each keeps one `input`, checked against the network's outputs, its
# own weight (WS-DAN weighs raw, crop and drop 1/3 each) and its own logged loss.
@register("ce_fine")
@dataclasses.dataclass(frozen=True)
class FineCrossEntropy(CrossEntropy):
  """CE of Coarse2Fine's fine pass, L_fine-grained of eq. (4) ('fine_logits')."""
  accuracy_metric: ClassVar[str] = "train_fine_accuracy"


@register("ce_crop")
@dataclasses.dataclass(frozen=True)
class CropCrossEntropy(CrossEntropy):
  """CE on WS-DAN's attention crops ('crop_logits', net 'bap' with crop_drop)."""
  accuracy_metric: ClassVar[str] = "train_crop_accuracy"


@register("ce_drop")
@dataclasses.dataclass(frozen=True)
class DropCrossEntropy(CrossEntropy):
  """CE on WS-DAN's attention-dropped images ('drop_logits')."""
  accuracy_metric: ClassVar[str] = "train_drop_accuracy"


@register("exit_ce")
@dataclasses.dataclass(frozen=True)
class ExitCrossEntropy(Term):
  """Softmax cross-entropy of every exit head, outputs[input] (N, M, C) logits of net
  'convnet_exits' (Savchenko 2021, optional fine-tuning with all heads): the mean over
  the M exits of each exit's mean CE; logs exit<m>_ce per exit, m = 0..M-1."""

  def __call__(self, outputs, batch, impostors, state):
    logits, labels = outputs[self.input], batch["label"]
    weights = batch["valid"].astype(jnp.float32)
    per_exit = jax.vmap(
        lambda z: _valid_mean(optax.softmax_cross_entropy_with_integer_labels(z, labels),
                              weights), in_axes=1)(logits)
    return per_exit.mean(), state, {f"exit{m}_ce": per_exit[m]
                                    for m in range(logits.shape[1])}


@register("nca")
@dataclasses.dataclass(frozen=True)
class NCA(Term):
  """NCA loss of eq. (4) over all M impostors (`fgjax.losses.nca_loss`), or over each
  row's k neighbours batch['neighbors'] where the policy provides them
  (`fgjax.losses.knn_nca_loss`; one term, so every scheme preset naming 'nca' trains
  by k-NN once the policy is a k-NN one).

  sigma: kernel width of eq. (2) during training.
  """
  sigma: float = 0.2
  uses_impostors: ClassVar[bool] = True
  reads_batch_fields: ClassVar[tuple[str, ...]] = ("neighbors",)

  def __call__(self, outputs, batch, impostors, state):
    args = (outputs[self.input], batch["label"], impostors.centers, impostors.labels)
    weights = impostors.log_weights
    if "neighbors" in batch:
      per_example = losses.knn_nca_loss(*args, batch["neighbors"], self.sigma,
                                        exclude=batch["index"],
                                        center_log_weights=weights)
    else:
      per_example = losses.nca_loss(*args, self.sigma, exclude=batch["index"],
                                    center_log_weights=weights)
    return _valid_mean(per_example, batch["valid"].astype(jnp.float32)), state, {}


@register("attachment")
@dataclasses.dataclass(frozen=True)
class Attachment(Term):
  """Loose impostors, eq. (6): ||f(x_i) - c_i||^2 to the image's own impostor."""
  uses_impostors: ClassVar[bool] = True

  def __call__(self, outputs, batch, impostors, state):
    own = jnp.take(impostors.centers, batch["index"], axis=0)
    per_example = losses.attachment_loss(outputs[self.input], own)
    return _valid_mean(per_example, batch["valid"].astype(jnp.float32)), state, {}


@dataclasses.dataclass(frozen=True)
class _ClassMeanTerm(Term):
  """A term with per-class means (C, *input_shape) as state, starting at zero.

  Zeros (ELoPE does not say how it initialises) need no pass over the training set and
  give one structure for init and restore; the online update pulls a class's mean to
  its features within a few of its batches (its weight on the zero start shrinks by
  1 - alpha N_c / (1 + N_c) per batch).

  alpha: mean update rate (ELoPE eq. 6 / Wen et al. eq. 4); normalize: l2-normalise
  the input first (ELoPE Sec. 4.1; it makes the margin scale-free).
  """
  alpha: float = 0.5
  normalize: bool = True

  def init_state(self, num_classes, input_shape):
    return jnp.zeros((num_classes,) + tuple(input_shape), jnp.float32)

  def _features(self, outputs):
    f = outputs[self.input].astype(jnp.float32)
    return losses.l2_normalize(f, _UNIT_EPS) if self.normalize else f


@register("center")
@dataclasses.dataclass(frozen=True)
class Center(_ClassMeanTerm):
  """Center loss, Wen et al. 2016: mean_n 0.5 ||f_n - mu_{y_n}||^2 over valid rows.

  Averaged (not summed) so the weight does not depend on the batch size; the means are
  held constant in the loss and then follow Wen et al.'s separate update
  mu <- mu - alpha * Delta mu (their eq. 4, the rule of ELoPE eq. 6-8), which sees the
  features without gradient.
  """

  def __call__(self, outputs, batch, impostors, means):
    f, labels = self._features(outputs), batch["label"]
    weights = batch["valid"].astype(jnp.float32)
    loss = _valid_mean(losses.center_loss(f, labels, jax.lax.stop_gradient(means)),
                       weights)
    new_means = losses.update_class_means(means, jax.lax.stop_gradient(f), labels,
                                          self.alpha, weights)
    return loss, new_means, {}


@register("elope")
@dataclasses.dataclass(frozen=True)
class ELoPE(_ClassMeanTerm):
  """ELoPE's L_e = L_w + L_b (eq. 5, 9, 10): the means are updated with the batch first
  (eq. 6) and the loss differentiates through that update.

  gamma: weight of the between-class term; margin: m of eq. (10), on squared
  distances between means.
  """
  gamma: float = 16.0
  margin: float = 0.75

  def __call__(self, outputs, batch, impostors, means):
    loss, new_means = losses.elope_loss(self._features(outputs), batch["label"], means,
                                        self.alpha, self.gamma, self.margin,
                                        batch["valid"].astype(jnp.float32))
    return loss, new_means, {}


@register("attention_center")
@dataclasses.dataclass(frozen=True)
class AttentionCenter(Term):
  """Attention center loss, Coarse2Fine eq. (2)-(3) / WS-DAN eq. (9): the mean over valid
  rows of sum_{m,c} (f - r_y)^2 on part features outputs[input] (N, M, C), against
  per-class centers (num_classes, M, C) that start at zero and move by
  c_y <- c_y + beta * sum_i (f_i - r_y) (fgjax.losses.attention; the sum over a class's
  rows, like TF's scatter_sub).

  beta: the center rate (WS-DAN 5e-2). normalize_center: r = c_y l2-normalised over
  all M*C entries (WS-DAN.PyTorch) instead of c_y. fine_input: a second output of the
  same shape whose rows join the loss and the update (Coarse2Fine Algorithm 1 line 12,
  L_center(CoarseFeats + FineFeats): the mean is then over both sets of rows); '' none.
  """
  beta: float = 0.05
  normalize_center: bool = True
  fine_input: str = ""

  def init_state(self, num_classes, input_shape):
    if len(input_shape) != 2:
      raise ValueError(f"config.loss.attention_center.input={self.input!r} has shape "
                       f"{tuple(input_shape)} per example; the term needs part "
                       "features (M, C), e.g. 'part_features' of net 'bap' or 'c2f'.")
    return jnp.zeros((num_classes,) + tuple(input_shape), jnp.float32)

  def __call__(self, outputs, batch, impostors, centers):
    inputs = (self.input, self.fine_input) if self.fine_input else (self.input,)
    f = jnp.concatenate([outputs[k].astype(jnp.float32) for k in inputs])
    labels = jnp.tile(batch["label"], len(inputs))
    weights = jnp.tile(batch["valid"].astype(jnp.float32), len(inputs))
    centers = jax.lax.stop_gradient(centers)
    ref = (losses.l2_normalize(centers.reshape(centers.shape[0], -1),
                                _UNIT_EPS).reshape(centers.shape)
           if self.normalize_center else centers)
    loss = _valid_mean(losses.attention_center_loss(f, labels, ref), weights)
    new_centers = losses.update_attention_centers(
        centers, jax.lax.stop_gradient(f), labels, self.beta, weights, reference=ref)
    return loss, new_centers, {}


@register("heatmap")
@dataclasses.dataclass(frozen=True)
class Heatmap(Term):
  """ELoPE section 5: smooth L1 (Girshick 2015, Fast R-CNN eq. 3) between a predicted
  heat map outputs[input] (N, I, J) and outputs[target], averaged over the cells.

  smooth_L1(d) = 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise. The target carries no
  gradient (the localized network stops it), so only the module learns.
  """
  target: str = "heatmap_target"

  def __call__(self, outputs, batch, impostors, state):
    pred, target = outputs[self.input], outputs[self.target]
    if pred.shape != target.shape:
      raise ValueError(f"loss term 'heatmap': outputs[{self.input!r}] has shape "
                       f"{tuple(pred.shape)} but outputs[{self.target!r}] has "
                       f"{tuple(target.shape)}; set config.model.localizer_map_size to "
                       "the side of the classifier's map.")
    d = jnp.abs(pred - target)
    per_cell = jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)
    per_example = jnp.mean(per_cell.reshape(per_cell.shape[0], -1), axis=1)
    return _valid_mean(per_example, batch["valid"].astype(jnp.float32)), state, {}


def make(name: str, **fields) -> Term:
  """Term `name` from its config fields (weight, input and its options)."""
  cls = TERMS.get(name)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.loss.{name} has field(s) {', '.join(unknown)} that the "
                     f"{name!r} term does not take; it takes {', '.join(sorted(known))}.")
  return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The weighted sum of `terms`; a pure function of (outputs, batch, impostors, state)."""
  terms: tuple[Term, ...]

  @property
  def uses_impostors(self) -> bool:
    return any(t.uses_impostors for t in self.terms)

  def init_state(self, num_classes: int,
                 output_shapes: dict[str, Any]) -> dict[str, Any]:
    """{term name: state} for the terms that keep one; shapes per example."""
    state = {}
    for t in self.terms:
      s = t.init_state(num_classes, tuple(output_shapes[t.input].shape[1:]))
      if s is not None:
        state[t.name] = s
    return state

  def __call__(self, outputs, batch, impostors, loss_state):
    total = 0.0
    new_state, metrics = {}, {}
    for t in self.terms:
      value, s, extra = t(outputs, batch, impostors, loss_state.get(t.name))
      if t.name in loss_state:
        new_state[t.name] = s
      metrics[f"{t.name}_loss"] = value
      metrics.update(extra)
      total = total + t.weight * value
    metrics["loss"] = total
    return total, new_state, metrics

  def describe(self) -> list[dict[str, Any]]:
    """JSON-friendly list of the terms and their settings, for results.json."""
    return [{"name": t.name, **dataclasses.asdict(t)} for t in self.terms]


def build(term_names: Sequence[str], loss_config: Any) -> Objective:
  """The objective of `term_names`, each configured by `loss_config.<name>`."""
  if not term_names:
    raise ValueError("the loss has no terms; set config.loss.terms (e.g. 'ce') or a "
                     "config.scheme whose preset names them.")
  if len(set(term_names)) != len(term_names):
    raise ValueError(f"config.loss terms {list(term_names)} name a term twice.")
  terms = []
  for name in term_names:
    section = loss_config.get(name) if name in TERMS else None
    if name in TERMS and section is None:
      raise ValueError(f"config.loss.{name} is missing: give the {name!r} term its "
                       "weight and input (configs/common.py has the defaults).")
    terms.append(make(name, **(section.to_dict() if hasattr(section, "to_dict")
                               else dict(section or {}))))
  return Objective(tuple(terms))
