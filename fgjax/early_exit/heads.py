"""Exit classifiers of sequential early-exit inference, on l2-normalised features.

Savchenko, "Sequential analysis in image recognition" (OpenTalks.AI 2021;
IJCNN 2020; Information Sciences 2021): exit m maps its features x_m (global
average pooling, then l2-normalisation; done by the exit branch, not here) to
C confidence scores s_m^(c)(x_m), predicts argmax_c (eq. 2) and answers when
max_c s_m^(c) exceeds its threshold (eq. 3, `fgjax.early_exit.thresholds`).
Scores are only ever compared within one exit, which is all the threshold rule
needs, so each head may use its own scale:

* 'svm': linear one-vs-rest SVM with the squared hinge loss (the paper's
  default); scores are its decision function w_c . x + b_c.
* 'logreg': multinomial logistic regression; scores are softmax probabilities.
* 'rbf': the RBF rule of impostor networks (Lebedev et al., eq. 2-3) with every
  fitted feature as a center; scores are the class posteriors p(c | x).

A head is an `ExitHead(kind, arrays)` of NumPy arrays, so several heads fit in
one .npz (`to_arrays` / `from_arrays`), and `scores` is a pure JAX function.
num_classes C is the row count of 'weight' for linear heads and an explicit
'num_classes' () int32 array for 'rbf' (its labels need not cover every class).
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import linear_model
from sklearn import svm

from fgjax import evaluate
from fgjax import impostors
from fgjax.losses import _checks

HEADS = ("svm", "logreg", "rbf")
# Leave-one-out grid for the RBF width; features are l2-normalised, so pairwise
# distances lie in [0, 2] and this grid spans near-1-NN to nearly uniform.
SIGMA_GRID = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Bias of classes absent from the fitted labels: far below any score a unit-norm
# feature can reach, so they never win and their softmax probability is 0.
ABSENT_BIAS = -1e4

_KEYS = {"svm": ("weight", "bias"), "logreg": ("weight", "bias"),
         "rbf": ("centers", "labels", "sigma", "num_classes")}
_DTYPES = {"weight": np.float32, "bias": np.float32, "centers": np.float32,
           "labels": np.int32, "sigma": np.float32, "num_classes": np.int32}
_QUERY_BLOCK = 1024    # leave-one-out queries per call: memory O(block * centers)
_CENTER_BLOCK = 4096

_rbf_log_probs = jax.jit(impostors.rbf_log_probs,
                         static_argnames=("num_classes", "chunk_size"))


def _kind_arg(kind: Any) -> str:
  if kind not in HEADS:
    raise ValueError(f"unknown head kind {kind!r}; use one of {HEADS}.")
  return kind


def _check_arrays(kind: str, arrays: Mapping[str, Any],
                  key: Callable[[str], str]) -> dict[str, np.ndarray]:
  """Arrays of a `kind` head cast to their dtypes; errors name `key(name)`."""
  out = {}
  for name in _KEYS[_kind_arg(kind)]:
    if key(name) not in arrays:
      raise ValueError(f"missing key {key(name)!r} for a {kind!r} head; it needs "
                       f"{[key(n) for n in _KEYS[kind]]}.")
    a = np.asarray(arrays[key(name)])
    want = _DTYPES[name]
    kind_ok = (np.issubdtype(a.dtype, np.floating) if want == np.float32 else
               np.issubdtype(a.dtype, np.integer))
    if not kind_ok:
      raise TypeError(f"{key(name)!r} must be {np.dtype(want).kind}-typed "
                      f"({np.dtype(want).name}); got {a.dtype}.")
    out[name] = a.astype(want)

  def shape_error(name, want):
    return ValueError(f"{key(name)!r} must have shape {want}; got "
                      f"{out[name].shape}.")

  if kind == "rbf":
    if out["centers"].ndim != 2 or out["centers"].shape[0] < 1:
      raise shape_error("centers", "(M >= 1, D)")
    if out["labels"].shape != out["centers"].shape[:1]:
      raise shape_error("labels", out["centers"].shape[:1])
    for name in ("sigma", "num_classes"):
      if out[name].shape != ():
        raise shape_error(name, "() (a scalar)")
    if not (np.isfinite(out["sigma"]) and out["sigma"] > 0):
      raise ValueError(f"{key('sigma')!r} must be finite and > 0; got {out['sigma']}.")
    c = int(out["num_classes"])
    if c < 1 or out["labels"].min() < 0 or out["labels"].max() >= c:
      raise ValueError(f"{key('labels')!r} must lie in [0, {key('num_classes')!r} = "
                       f"{c}); got min {out['labels'].min()}, max "
                       f"{out['labels'].max()}.")
  else:
    if out["weight"].ndim != 2 or out["weight"].shape[0] < 1:
      raise shape_error("weight", "(C >= 1, D)")
    if out["bias"].shape != out["weight"].shape[:1]:
      raise shape_error("bias", out["weight"].shape[:1])
  return out


@dataclasses.dataclass(frozen=True)
class ExitHead:
  """One exit's classifier: its kind (one of HEADS) and NumPy arrays.

  Linear kinds: 'weight' (C, D) float32, 'bias' (C,) float32. 'rbf': 'centers'
  (Mi, D) float32, 'labels' (Mi,) int32, 'sigma' () float32, 'num_classes' ()
  int32. Construction validates keys and shapes and casts the dtypes.
  """
  kind: str
  arrays: dict[str, np.ndarray]

  def __post_init__(self):
    object.__setattr__(self, "arrays",
                       _check_arrays(self.kind, self.arrays, lambda name: name))

  @property
  def num_classes(self) -> int:
    """C, the width of `scores`."""
    if self.kind == "rbf":
      return int(self.arrays["num_classes"])
    return int(self.arrays["weight"].shape[0])

  @property
  def dim(self) -> int:
    """D, the feature size the head takes."""
    return int(self.arrays["centers" if self.kind == "rbf" else "weight"].shape[1])


def _prefix_arg(prefix: Any) -> str:
  if not isinstance(prefix, str) or not prefix:
    raise ValueError(f"`prefix` must be a non-empty string (e.g. 'exit0'); got "
                     f"{prefix!r}.")
  return prefix


def to_arrays(head: ExitHead, prefix: str) -> dict[str, np.ndarray]:
  """The head's arrays as {f"{prefix}/{name}": copy}, ready for np.savez."""
  prefix = _prefix_arg(prefix)
  return {f"{prefix}/{name}": a.copy() for name, a in head.arrays.items()}


def from_arrays(kind: str, arrays: Mapping[str, Any], prefix: str) -> ExitHead:
  """Inverse of `to_arrays`: the `kind` head stored under `prefix` in `arrays`.

  `arrays` may hold other heads' keys (e.g. a loaded .npz); a missing key or a
  wrong shape raises a ValueError naming the full key.
  """
  prefix = _prefix_arg(prefix)
  checked = _check_arrays(kind, arrays, lambda name: f"{prefix}/{name}")
  return ExitHead(kind, checked)


def _fit_linear(kind: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                seed: int, C: float) -> ExitHead:
  present = np.unique(y)
  if len(present) < 2:
    raise ValueError(f"a {kind!r} head needs >= 2 classes in `labels`; got only "
                     f"{present.tolist()}. Use kind='rbf' or add classes.")
  if kind == "svm":
    model = svm.LinearSVC(loss="squared_hinge", C=C, random_state=seed)
  else:
    model = linear_model.LogisticRegression(C=C, max_iter=1000)
  model.fit(x, y)
  w, b = model.coef_, model.intercept_
  if w.shape[0] == 1:
    # Binary: sklearn keeps one row z = w . x + b scoring classes_[1] over
    # classes_[0]. The SVM's mirror pair (-z, z) is what one-vs-rest would fit;
    # logits (-z/2, z/2) give softmax = sigmoid(z), sklearn's predict_proba.
    half = 1.0 if kind == "svm" else 0.5
    w, b = np.concatenate([-half * w, half * w]), np.concatenate([-half * b, half * b])
  weight = np.zeros((num_classes, x.shape[1]), np.float32)
  bias = np.full((num_classes,), ABSENT_BIAS, np.float32)
  weight[model.classes_] = w
  bias[model.classes_] = b
  return ExitHead(kind, {"weight": weight, "bias": bias})


def _loo_top1(x: np.ndarray, y: np.ndarray, sigma: float, num_classes: int) -> float:
  """Top-1 of the RBF rule classifying each point by all the others."""
  imp = impostors.ImpostorSet(jnp.asarray(x), jnp.asarray(y))
  log_probs = [np.asarray(_rbf_log_probs(
      jnp.asarray(x[i:i + _QUERY_BLOCK]), imp, sigma, num_classes=num_classes,
      exclude=jnp.arange(i, min(i + _QUERY_BLOCK, len(x)), dtype=jnp.int32),
      chunk_size=_CENTER_BLOCK)) for i in range(0, len(x), _QUERY_BLOCK)]
  return evaluate.topk_accuracy(np.concatenate(log_probs), y, (1,))["top1"]


def fit(kind: str, features: np.ndarray, labels: np.ndarray, num_classes: int, *,
        seed: int = 0, C: float = 1.0, sigma: Optional[float] = None) -> ExitHead:
  """Fits one exit's classifier on its (l2-normalised) features.

  Classes absent from `labels` get weight 0 and bias ABSENT_BIAS in linear heads
  (never the argmax; softmax probability 0) and simply no center in 'rbf' heads
  (probability exactly 0), so every head scores all num_classes classes.

  Args:
    kind: one of HEADS.
    features: (N, D) finite float features x_m of exit m.
    labels: (N,) int classes in [0, num_classes).
    num_classes: C.
    seed: LinearSVC's random_state (its dual coordinate descent shuffles).
    C: inverse l2 regularisation of 'svm' and 'logreg' (> 0); unused by 'rbf'.
    sigma: RBF width (> 0) of 'rbf'. None picks it from SIGMA_GRID by
      leave-one-out top-1 on `features` (each point classified by the others, as
      in eq. 4 of impostor networks); ties go to the smaller sigma (sharper
      posteriors, so more images clear the exit threshold).

  Returns:
    The fitted ExitHead.
  """
  kind = _kind_arg(kind)
  num_classes = _checks.num_classes_arg(num_classes)
  x = np.asarray(_checks.check_float_array(features, "features", 2), np.float32)
  y = np.asarray(_checks.int_array(labels, "labels", 1))
  if x.shape[0] == 0:
    raise ValueError("`features` is empty (N = 0); need >= 1 training feature.")
  if not np.isfinite(x).all():
    raise ValueError("`features` contains NaN or inf; fix the exit branch output.")
  _checks.same_size(y, "labels", 0, x, "features", 0)
  _checks.labels_in_range(y, "labels", num_classes)
  if not (np.isfinite(C) and C > 0):
    raise ValueError(f"`C` must be a finite number > 0; got {C}.")
  if kind != "rbf":
    return _fit_linear(kind, x, y, num_classes, seed, C)
  if sigma is None:
    top1 = {s: _loo_top1(x, y, s, num_classes) for s in SIGMA_GRID}
    sigma = max(SIGMA_GRID, key=lambda s: (top1[s], -s))
  elif not (np.isfinite(sigma) and sigma > 0):
    raise ValueError(f"`sigma` must be a finite number > 0 or None; got {sigma}.")
  return ExitHead("rbf", {"centers": x, "labels": y, "sigma": np.float32(sigma),
                          "num_classes": np.int32(num_classes)})


def scores(head: ExitHead, features: Any) -> jax.Array:
  """Confidence scores s_m^(c)(x) of eq. (2)-(3), (N, D) -> (N, C).

  'svm': x @ weight.T + bias, sklearn's decision_function after the class
  mapping of `fit`. 'logreg': softmax of that map, sklearn's predict_proba on the
  fitted classes. 'rbf': p(c | x) = sum_{i: l_i = c} w_i / sum_i w_i with
  w_i = exp(-||x - c_i||^2 / (2 sigma^2)), via `fgjax.impostors.rbf_log_probs`
  (per-class log-sum-exp, so small sigma never gives 0/0); rows sum to 1.

  Pure: works on NumPy or JAX input and under `jax.jit` with the head's arrays
  closed over as constants.
  """
  x = _checks.float_array(features, "features", 2)
  x = x.astype(_checks.compute_dtype(x.dtype))
  a = head.arrays
  if head.kind == "rbf":
    imp = impostors.ImpostorSet(jnp.asarray(a["centers"]), jnp.asarray(a["labels"]))
    return jnp.exp(impostors.rbf_log_probs(x, imp, a["sigma"], head.num_classes))
  weight = jnp.asarray(a["weight"])
  _checks.same_dim(x, "features", weight, "head weight")
  # HIGHEST: GPUs would otherwise run f32 matmuls in TF32, enough to move
  # scores across a threshold.
  logits = jnp.matmul(x, weight.T, precision=jax.lax.Precision.HIGHEST) + a["bias"]
  return jax.nn.softmax(logits, axis=-1) if head.kind == "logreg" else logits


__all__ = ["HEADS", "SIGMA_GRID", "ABSENT_BIAS", "ExitHead", "to_arrays",
           "from_arrays", "fit", "scores"]
