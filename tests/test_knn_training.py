"""k-NN impostor training end to end on the digits data: the knn / knn_loose policies
with the fixed / loose schemes, checkpoint and resume, and k = M against full NCA."""

import jax
import numpy as np
import pytest

from fgjax import config_checks
from fgjax import parallel
from fgjax import train
from fgjax import workdir
from tests.train_helpers import read_losses
from tests.train_helpers import restored
from tests.train_helpers import small_config

POLICY = {"fixed": "knn", "loose": "knn_loose"}


def _knn_config(scheme, steps, **overrides):
  return small_config(scheme, steps=steps, **{"impostors.policy": POLICY[scheme],
                                              **overrides})


def _restore(workdir, config, step):
  return restored(workdir, config, step)[1]


def _first_step(config):
  run = train.Run(config)
  state = run.initial_state()
  batch = parallel.global_batch(next(run.outputs.train_batches(0)), run.mesh)
  new_state, metrics = run.make_update()(state, batch)
  return parallel.to_host(metrics), parallel.to_host(new_state.params)


@pytest.mark.parametrize("scheme", ["fixed", "loose"])
def test_k_equal_m_matches_full_nca_first_step(scheme):
  # k = M = 1,078 training digits: capped at M - 1, every other impostor.
  knn_metrics, knn_params = _first_step(_knn_config(scheme, 2, **{"impostors.knn_k": 1078}))
  full_metrics, full_params = _first_step(small_config(scheme, steps=2))
  assert full_metrics["nca_loss"] > 0.1
  for key in ("loss", "nca_loss", "grad_norm"):
    np.testing.assert_allclose(knn_metrics[key], full_metrics[key], rtol=1e-5)
  # Adam's first step is ~ lr * g / |g| (lr 3e-3), which blows float32 rounding of
  # near-zero gradients (far impostors) up to a share of a step: compare the updated
  # params loosely, the gradient through grad_norm above.
  for a, b in zip(jax.tree.leaves(knn_params), jax.tree.leaves(full_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-4)
  # With k = 16 the term does sum over the lists only: another loss.
  small_k, _ = _first_step(_knn_config(scheme, 2, **{"impostors.knn_k": 16}))
  assert abs(small_k["nca_loss"] - full_metrics["nca_loss"]) > 0.1


@pytest.mark.parametrize("scheme", ["fixed", "loose"])
def test_knn_trains_checkpoints_and_resumes(tmp_path, scheme):
  fields = {"impostors.knn_k": 16, "impostors.knn_refresh_every_steps": 3,
            "train.checkpoint_every_steps": 4}
  full, split = tmp_path / "full", tmp_path / "split"
  results = train.train_and_evaluate(_knn_config(scheme, 8, **fields), str(full))
  assert results["scheme"]["policy"] == POLICY[scheme]
  assert results["splits"]["test"]["rbf"]["top1"] > 0.15   # chance: 0.1
  train.train_and_evaluate(_knn_config(scheme, 4, **fields), str(split))
  train.train_and_evaluate(_knn_config(scheme, 8, **fields), str(split))  # resumes at 4

  config = _knn_config(scheme, 8, **fields)
  initial = np.asarray(train.Run(config).initial_state().impostor_state["neighbors"])
  states = {(name, step): _restore(tmp_path / name, config, step)
            for name in ("full", "split") for step in (4, 8)}
  for step in (4, 8):
    lists = [np.asarray(states[name, step].impostor_state["neighbors"])
             for name in ("full", "split")]
    assert lists[0].shape == (1078, 16) and lists[0].dtype == np.int32
    # The lists the split run restored at step 4 and refreshed at 6 are those of the
    # uninterrupted run.
    np.testing.assert_array_equal(lists[1], lists[0])
    # Refreshed at step 3 (and 6) from the moved network: not the initial lists.
    assert (lists[0] != initial).any(axis=1).mean() > 0.1
    assert not (lists[0] == np.arange(1078)[:, None]).any()   # never the own impostor
    for a, b in zip(jax.tree.leaves(states["full", step].params),
                    jax.tree.leaves(states["split", step].params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  losses = {name: read_losses(tmp_path / name) for name in ("full", "split")}
  assert sorted(losses["split"]) == list(range(1, 9))
  for step in range(1, 9):
    np.testing.assert_allclose(losses["split"][step], losses["full"][step], rtol=1e-5)
  moved = np.abs(np.asarray(states["full", 8].impostors.centers)
                 - np.asarray(train.Run(config).initial_state().impostors.centers)).max()
  assert (moved > 1e-4) == (scheme == "loose")   # knn_loose trains its impostors


def test_knn_policy_without_a_term_reading_its_lists_is_refused():
  config = small_config("ce", steps=2, **{"model.net": "convnet_extra",
                                          "impostors.policy": "knn"})
  with pytest.raises(ValueError, match=r"adds batch field\(s\) \['neighbors'\]"):
    train.Run(config)


@pytest.mark.parametrize("field,value,message", [
    ("knn_k", 0, r"config\.impostors\.knn_k=0 must be an int >= 1"),
    ("knn_refresh_every_steps", -1,
     r"config\.impostors\.knn_refresh_every_steps=-1 must be an int >= 0"),
    ("knn_backend", "faiss", r"config\.impostors\.knn_backend='faiss' is unknown; use "
                             r"one of exact, scann"),
])
def test_bad_knn_fields_name_the_field(field, value, message):
  config = small_config("fixed", steps=2, **{"impostors.policy": "knn"})
  config.impostors[field] = value
  with pytest.raises(ValueError, match=message):
    config_checks.validate(config)


def test_workdirs_from_before_the_knn_fields_resume():
  new = small_config("loose", steps=2).to_dict()
  old = {**new, "impostors": {k: v for k, v in new["impostors"].items()
                              if not k.startswith("knn_")}}
  bad, fine = workdir.config_changes(old, new)
  assert bad == [] and {f for f, _, _ in fine} == {
      "impostors.knn_k", "impostors.knn_refresh_every_steps", "impostors.knn_backend"}
  # Within a knn run's own workdir, k is part of what is trained.
  changed = small_config("loose", steps=2, **{"impostors.knn_k": 32}).to_dict()
  assert [f for f, _, _ in workdir.config_changes(new, changed)[0]] == ["impostors.knn_k"]
