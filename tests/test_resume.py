"""Resuming and starting from a workdir: a killed run resumes to the uninterrupted
result, a changed config is refused before anything is written, and init_from restores
exactly the parts it names."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fgjax import train
from tests.train_helpers import REPO
from tests.train_helpers import aux_config
from tests.train_helpers import read_json
from tests.train_helpers import read_rows
from tests.train_helpers import restored
from tests.train_helpers import small_config
from tests.train_helpers import without_times


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
  steps = 24
  full = tmp_path / "full"
  train.train_and_evaluate(small_config("loose", steps=steps), str(full))
  _, reference = restored(full, small_config("loose", steps=steps))

  killed = tmp_path / "killed"
  script = (
      "import sys; sys.path.insert(0, %r)\n"
      "from tests.train_helpers import small_config\n"
      "from fgjax import train\n"
      "train.train_and_evaluate(small_config('loose', steps=%d, **{'train.checkpoint_every_steps': 2}), %r)\n"
  ) % (str(REPO), steps * 50, str(killed))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    done = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
    if done and max(done) >= 6:
      break
    if proc.poll() is not None:
      pytest.fail("training subprocess exited before it could be killed")
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Resume with the same total as the reference run (checkpoint_every_steps and the
  # number of steps are fields a resume may change).
  results = train.train_and_evaluate(small_config("loose", steps=steps), str(killed))
  assert results["steps"] == steps
  step, resumed = restored(killed, small_config("loose", steps=steps))
  assert step == steps
  for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # Every step logged once, and the same results as the uninterrupted run.
  rows = read_rows(killed)
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  want = read_json(full / "results.json")
  got = read_json(killed / "results.json")
  assert got["impostor_scale"] == want["impostor_scale"] is not None
  assert without_times(got)["splits"] == without_times(want)["splits"]


def test_resume_matches_uninterrupted_run(tmp_path):
  run = train.Run(aux_config())
  real, abstract = run.initial_state(), run.abstract_state()
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(real)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
  full = train.train_and_evaluate(aux_config(steps=6), str(tmp_path / "full"))
  train.train_and_evaluate(aux_config(steps=4), str(tmp_path / "part"))
  results = train.train_and_evaluate(aux_config(steps=6), str(tmp_path / "part"))
  assert results["steps"] == 6
  # Resumed at step 4, not restarted: steps 1-4 are logged once.
  rows = read_rows(tmp_path / "part")
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  _, reference = restored(tmp_path / "full", aux_config(steps=6))
  _, resumed = restored(tmp_path / "part", aux_config(steps=6))
  for key in ("loss_state", "params"):
    for a, b in zip(jax.tree.leaves(getattr(reference, key)),
                    jax.tree.leaves(getattr(resumed, key))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert without_times(results) == without_times(full)


def test_resume_refuses_another_config_before_writing(tmp_path):
  config = small_config("loose", steps=4)
  train.train_and_evaluate(config, str(tmp_path))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  changed = small_config("tied", steps=4, **{"train.batch_size": 32,
                                             "model.pooling": "max",
                                             "loss.extra_terms": "elope"})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(changed, str(tmp_path))
  msg = str(e.value)
  for field in ("config.scheme: 'loose' -> 'tied'", "config.train.batch_size: 64 -> 32",
                "config.model.pooling: 'avg' -> 'max'", "config.loss.extra_terms",
                "--workdir"):
    assert field in msg, (field, msg)
  assert "config.train.num_steps" not in msg  # unchanged: not listed
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  assert after == before  # config.json, results.json, metrics.jsonl untouched


def test_resume_allows_a_longer_run_and_logs_it(tmp_path):
  train.train_and_evaluate(small_config("loose", steps=4), str(tmp_path))
  results = train.train_and_evaluate(
      small_config("loose", steps=6, **{"train.log_every_steps": 2}), str(tmp_path))
  assert results["steps"] == 6
  assert read_json(tmp_path / "config.json")["train"]["num_steps"] == 6
  rows = [r["step"] for r in read_rows(tmp_path)]
  assert rows == [1, 2, 3, 4, 6]
  # With a cosine schedule the length decides the learning rate: not harmless.
  cos = {"optim.schedule": "cosine"}
  train.train_and_evaluate(small_config("loose", steps=4, **cos), str(tmp_path / "c"))
  with pytest.raises(ValueError, match=r"config\.train\.num_steps: 4 -> 6"):
    train.train_and_evaluate(small_config("loose", steps=6, **cos), str(tmp_path / "c"))


def test_init_from_restores_what_it_names(tmp_path):
  # Stage 1: k-max pooling, loose impostors and ELoPE class means.
  stage1 = small_config("loose", steps=6, **{"model.pooling": "kmax", "model.pooling_k": 2,
                                             "loss.extra_terms": "elope"})
  train.train_and_evaluate(stage1, str(tmp_path / "s1"))
  _, src = restored(tmp_path / "s1", stage1)
  # Stage 2: weighted k-max fine-tuning from it, with its impostors and class means.
  stage2 = small_config("loose", steps=2, **{
      "model.pooling": "weighted_kmax", "model.pooling_k": 2, "loss.extra_terms": "elope",
      "init_from": str(tmp_path / "s1"),
      "init_from_parts": "net,impostors,loss_state"})
  state = train.Run(stage2).initial_state()
  assert int(state.step) == 0
  np.testing.assert_array_equal(state.params["net"]["pool"]["weights"], [1.0, 1.0])
  for part in ("backbone", "embed"):
    jax.tree.map(np.testing.assert_array_equal, state.params["net"][part],
                 src.params["net"][part])
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats, src.batch_stats)
  jax.tree.map(np.testing.assert_array_equal, state.impostors, src.impostors)
  np.testing.assert_array_equal(state.loss_state["elope"], src.loss_state["elope"])
  np.testing.assert_array_equal(state.impostor_state["scale"], src.impostor_state["scale"])
  # Only the network: impostors are recomputed from the loaded network, means start at 0.
  only_net = small_config("loose", steps=2, **{
      "model.pooling": "weighted_kmax", "model.pooling_k": 2, "loss.extra_terms": "elope",
      "init_from": str(tmp_path / "s1")})
  run = train.Run(only_net)
  state = run.initial_state()
  assert float(np.abs(np.asarray(state.loss_state["elope"])).max()) == 0.0
  emb, _ = run.outputs.train_embeddings(
      {"params": src.params["net"] | {"pool": {"weights": np.ones(2, np.float32)}},
       "batch_stats": src.batch_stats})
  scale = np.linalg.norm(emb, axis=1).mean()
  np.testing.assert_allclose(state.impostors.centers, emb / scale, rtol=1e-4, atol=1e-5)
  # A shape that differs is an error naming the parameter.
  wider = small_config("loose", steps=2, **{"model.pooling": "kmax", "model.pooling_k": 2,
                                            "model.embed_dim": 32,
                                            "init_from": str(tmp_path / "s1")})
  with pytest.raises(ValueError, match=r"params/embed/(bias|kernel) has shape"):
    train.Run(wider).initial_state()
  with pytest.raises(ValueError, match=r"config\.init_from_parts"):
    train.Run(small_config(**{"init_from": str(tmp_path / "s1"),
                              "init_from_parts": "impostors"}))
  with pytest.raises(ValueError, match=r"config\.init_from='/nonexistent'"):
    train.Run(small_config(**{"init_from": "/nonexistent"}))
