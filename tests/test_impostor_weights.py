"""Per-impostor weights w_j = exp(u_j) (NNGK review eq. 4 / 7): the losses and the rule
eq. (3) against float64 NumPy, end to end on the digits data, and the checkpoints
written before them."""

import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy.special import logsumexp

from fgjax import artifact
from fgjax import checkpoints
from fgjax import evaluate
from fgjax import impostors as impostors_lib
from fgjax import losses
from fgjax import optim
from fgjax import train
from tests.test_predict import digits_test_images
from tests.train_helpers import restored
from tests.train_helpers import small_config

B, M, D, C = 7, 40, 5, 3


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, D)), rng.integers(0, C, B), rng.normal(size=(M, D)),
          rng.integers(0, C, M), rng.normal(size=M) * 2, rng.integers(-1, M, B))


def _reference(q, ql, c, cl, u, ex, sigma):
  """Per-query loss of eq. (4) with a_ij = -d_ij / (2 sigma^2) + u_j, float64."""
  a = -((q[:, None] - c[None]) ** 2).sum(-1) / (2 * sigma ** 2) + u[None]
  keep = np.arange(M)[None] != ex[:, None]
  pos = keep & (cl[None] == ql[:, None])
  return np.array([logsumexp(a[i][keep[i]]) - logsumexp(a[i][pos[i]]) if pos[i].any()
                   else 0.0 for i in range(B)])


@pytest.mark.parametrize("chunk", [None, 7])
def test_weighted_nca_loss_and_gradients_match_numpy(chunk):
  q, ql, c, cl, u, ex = _problem()
  f = lambda q, c, u, s: losses.nca_loss(  # noqa: E731
      q.astype(np.float32), ql, c.astype(np.float32), cl, s, exclude=ex, chunk_size=chunk,
      center_log_weights=u.astype(np.float32))
  want = _reference(q, ql, c, cl, u, ex, 0.8)
  assert want.max() > 0.5
  np.testing.assert_allclose(f(q, c, u, 0.8), want, rtol=2e-5, atol=2e-6)
  grads = jax.grad(lambda *a: f(*a).sum(), (0, 1, 2, 3))(
      jnp.float32(q), jnp.float32(c), jnp.float32(u), jnp.float32(0.8))
  h = 1e-6
  for arg, got in zip(range(4), grads):
    base = [q, c, u, 0.8]
    flat = np.asarray(base[arg], np.float64).ravel()
    num = np.zeros_like(flat)
    for j in range(flat.size):
      for sign in (1, -1):
        moved = flat.copy()
        moved[j] += sign * h
        args = list(base)
        args[arg] = moved.reshape(np.shape(base[arg])) if arg < 3 else moved[0]
        num[j] += sign * _reference(args[0], ql, args[1], cl, args[2], ex, args[3]).sum()
    np.testing.assert_allclose(np.asarray(got).ravel(), num / (2 * h), rtol=2e-3,
                               atol=2e-4)


def test_weights_reduce_to_the_unweighted_loss_and_only_differences_matter():
  q, ql, c, cl, u, ex = (np.asarray(x, np.float32) if x.dtype == np.float64 else x
                         for x in _problem(1))
  plain = losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex)
  np.testing.assert_allclose(losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex,
                                             center_log_weights=np.zeros(M)), plain,
                             rtol=1e-6)
  shifted = [losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex, center_log_weights=u + t)
             for t in (0.0, 50.0)]
  np.testing.assert_allclose(shifted[1], shifted[0], rtol=1e-5)
  assert np.abs(np.asarray(shifted[0]) - np.asarray(plain)).max() > 0.1
  # k-NN over every other center (a permutation of all M) is the full weighted loss.
  idx = np.stack([np.random.default_rng(i).permutation(M) for i in range(B)])
  np.testing.assert_allclose(
      losses.knn_nca_loss(q, ql, c, cl, idx, 0.5, exclude=ex, center_log_weights=u),
      shifted[0], rtol=1e-5)
  g_knn, g_full = (jax.grad(lambda w, fn=fn: fn(w).sum())(jnp.asarray(u)) for fn in (
      lambda w: losses.knn_nca_loss(q, ql, c, cl, idx, 0.5, exclude=ex,
                                    center_log_weights=w),
      lambda w: losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex, center_log_weights=w)))
  np.testing.assert_allclose(g_knn, g_full, rtol=1e-4, atol=1e-6)


def test_weighted_rule_eq3_matches_numpy_exactly_and_over_neighbours():
  q, _, c, cl, u, _ = _problem(2)
  imps = impostors_lib.ImpostorSet(jnp.float32(c), jnp.int32(cl), jnp.float32(u))
  got = np.asarray(impostors_lib.rbf_log_probs(jnp.float32(q), imps, 0.9, C))
  a = -((q[:, None] - c[None]) ** 2).sum(-1) / (2 * 0.81) + u[None]
  want = np.stack([logsumexp(np.where(cl[None] == k, a, -np.inf), axis=1)
                   for k in range(C)], 1)
  want -= logsumexp(a, axis=1)[:, None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Every impostor a "neighbour": the k-NN rule equals the exhaustive one.
  d2 = ((q[:, None] - c[None]) ** 2).sum(-1)
  idx = np.broadcast_to(np.arange(M), (B, M))
  np.testing.assert_allclose(impostors_lib.rbf_log_probs_from_neighbors(
      jnp.float32(d2), idx, cl, 0.9, C, log_weights=jnp.float32(u)), want, rtol=1e-5,
                             atol=1e-5)
  # A heavy impostor pulls its class up.
  heavy = u.copy()
  heavy[cl == 0] += 3
  lifted = impostors_lib.rbf_log_probs(jnp.float32(q), imps._replace(
      log_weights=jnp.float32(heavy)), 0.9, C)
  assert (np.asarray(lifted)[:, 0] > got[:, 0]).all()


@pytest.mark.parametrize("scheme,devices", [("fixed", 1), ("loose", 4)])
def test_weights_train_in_every_scheme_and_serve_from_the_artifact(tmp_path, scheme,
                                                                   devices):
  config = small_config(scheme, steps=20, num_devices=devices,
                        **{"impostors.weights": True})
  results = train.train_and_evaluate(config, str(tmp_path))
  run = train.Run(config)
  _, state = restored(tmp_path, run)
  u = state.impostors.log_weights
  assert u.shape == (run.layout.rows,)
  assert {s.data.shape for s in u.addressable_shards} == {(run.layout.rows // devices,)}
  u = np.asarray(u)[:1078]
  assert np.abs(u).max() > 1e-3                       # learned, also for fixed centers
  initial = run.initial_state().impostors
  centers_moved = np.abs(np.asarray(state.impostors.centers)
                         - np.asarray(initial.centers)).max()
  assert (centers_moved > 1e-4) == (scheme == "loose")
  model = artifact.Model(str(tmp_path / "artifact"))
  np.testing.assert_allclose(model.impostors.log_weights, u, rtol=1e-6)
  x, labels = digits_test_images(config, model)
  top1 = evaluate.topk_accuracy(model.log_probs(x), labels, (1,))["top1"]
  assert top1 == pytest.approx(results["splits"]["test"]["rbf"]["top1"], abs=1e-9)
  assert top1 > 0.3


def test_weights_need_impostors():
  config = small_config("ce", steps=2, **{"impostors.weights": True})
  with pytest.raises(ValueError, match=r"config\.impostors\.weights=True weighs"):
    train.Run(config)


class _OldImpostorSet(NamedTuple):
  """The impostor set as checkpoints before the weights stored it."""
  centers: jax.Array
  labels: jax.Array


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path):
  # Before the weights, ImpostorSet had two fields and fixed impostors sat in the
  # optimiser's tree (labelled frozen): write step 2 that way, then resume.
  config = small_config("fixed", steps=6)
  train.train_and_evaluate(small_config("fixed", steps=2), str(tmp_path / "new"))
  run = train.Run(config)
  _, state = restored(tmp_path / "new", run)
  imps = state.impostors
  trainable = {"net": state.params["net"], "centers": imps.centers}
  tx = optim.make_optimizer(config, optim.trainable_labels(
      trainable, train_impostors=False, frozen=run.frozen), run.total_steps)
  new_opt = jax.tree.leaves(state.opt_state)
  old_opt = tx.init(trainable)
  assert len(jax.tree.leaves(old_opt)) == len(new_opt)
  old_opt = jax.tree.unflatten(jax.tree.structure(old_opt), new_opt)
  old = {"step": state.step, "params": {"net": state.params["net"], "impostors":
                                        _OldImpostorSet(imps.centers, imps.labels)},
         "batch_stats": state.batch_stats, "opt_state": old_opt,
         "loss_state": state.loss_state, "impostor_state": state.impostor_state}
  (tmp_path / "old").mkdir()
  shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
  manager = checkpoints.manager(str(tmp_path / "old"))
  manager.save(2, args=ocp.args.StandardSave(old))
  manager.close()
  resumed = train.train_and_evaluate(config, str(tmp_path / "old"))
  fresh = train.train_and_evaluate(config, str(tmp_path / "fresh"))
  assert resumed["steps"] == 6
  assert resumed["splits"]["test"] == fresh["splits"]["test"]
