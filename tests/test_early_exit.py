"""Sequential early exit end to end on the digits: nothing past an image's exit runs,
compaction never recompiles, the runtime takes the decisions the fitted thresholds
promise, and the artifact and predict serve them."""

import json

import ml_collections
import numpy as np
import pytest

from configs import digits_early_exit
from fgjax import artifact
from fgjax import objectives
from fgjax import predict
from fgjax import train
from fgjax.early_exit import fit as fit_lib
from fgjax.early_exit import heads as heads_lib
from fgjax.early_exit import sequential as sequential_lib
from fgjax.early_exit import training as training_lib
from fgjax.models import pooling
from tests.test_predict import digits_test_files, digits_test_images, train_briefly

EXITS = ("stage1", "stage2", "map")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = digits_early_exit.get_config()
  workdir, results = train_briefly(tmp_path_factory, "digits_ee", config)
  model = artifact.Model(str(workdir / "artifact"))
  x, labels = digits_test_images(config, model)
  return dict(config=config, workdir=workdir, results=results, model=model, x=x,
              labels=labels)


def _heads(model):
  with np.load(f"{model.path}/early_exit.npz") as z:
    arrays = {k: z[k] for k in z.files}
  return [heads_lib.from_arrays("svm", arrays, f"exit{m}") for m in range(len(EXITS))]


def _sequential(model, thresholds, max_batch=32):
  return sequential_lib.Sequential(
      model.network.module.backbone, training_lib.backbone_variables(model.variables),
      EXITS, _heads(model), thresholds, max_batch=max_batch)


def _exit_scores(model, x):
  """Each exit head's scores from one full backbone pass (no early exit)."""
  out = model.network.module.backbone.apply(
      training_lib.backbone_variables(model.variables), x, train=False)
  return [np.asarray(heads_lib.scores(h, pooling.exit_features(out[e])))
          for h, e in zip(_heads(model), EXITS)]


def test_results_and_artifact_record_the_exits(trained):
  ee = trained["results"]["early_exit"]
  assert ee["head"] == "svm" and ee["rule"] == "adaptive" and ee["alpha"] == 0.1
  meta = trained["model"].meta["early_exit"]
  assert meta["exits"] == list(EXITS) and meta["thresholds"] == ee["thresholds"]
  test = ee["test"]
  assert set(test["exit_top1"]) == set(EXITS)
  assert all(0.5 < v <= 1 for v in test["exit_top1"].values())
  rows = test["sequential"]
  assert len(rows) == 2 * len(trained["config"].early_exit.alpha_grid)
  for row in rows:
    assert sum(row["exit_fraction"]) == pytest.approx(1.0)
  # A larger alpha lets more images out early, under either rule.
  for rule in ("adaptive", "fixed"):
    first = [r["exit_fraction"][0] for r in rows if r["rule"] == rule]
    assert first == sorted(first)


def test_runtime_takes_the_decisions_of_the_fitted_thresholds(trained):
  model, x, labels = trained["model"], trained["x"], trained["labels"]
  thresholds = np.asarray(model.meta["early_exit"]["thresholds"])
  scores = _exit_scores(model, x)
  want = fit_lib.simulate(scores, thresholds)
  got = model.early_exit()(x)
  assert np.mean(got["exit"] == want["exit"]) >= 0.99
  assert np.mean(got["label"] == want["label"]) >= 0.99
  configured = trained["results"]["early_exit"]["test"]["configured"]
  assert np.mean(want["label"] == labels) == pytest.approx(configured["top1"])
  rows = np.flatnonzero(got["exit"] == want["exit"])
  for m in range(len(EXITS)):
    at = rows[got["exit"][rows] == m]
    np.testing.assert_allclose(got["scores"][at], scores[m][at], rtol=1e-4, atol=1e-4)


def test_nothing_past_an_exit_runs(trained):
  model, x = trained["model"], trained["x"][:20]
  everyone_leaves = _sequential(model, [-np.inf, -np.inf, 0.0])
  out = everyone_leaves(x)
  assert everyone_leaves.calls == [1, 0, 0] and np.all(out["exit"] == 0)
  nobody_leaves = _sequential(model, [np.inf, np.inf, 0.0])
  out = nobody_leaves(x)
  assert nobody_leaves.calls == [1, 1, 1] and np.all(out["exit"] == 2)
  # Batch 1: one segment call per exit reached, none after.
  one = _sequential(model, model.meta["early_exit"]["thresholds"])
  for i in range(6):
    before = list(one.calls)
    at = int(one(x[i:i + 1])["exit"][0])
    assert [a - b for a, b in zip(one.calls, before)] == [1] * (at + 1) + [0] * (2 - at)


def test_compaction_never_recompiles_after_warm_up(trained):
  model, x = trained["model"], trained["x"]
  seq = _sequential(model, model.meta["early_exit"]["thresholds"], max_batch=8)
  assert seq.buckets == (1, 2, 4, 8)
  seq.warm_up(x.shape[1:])
  sizes = [s._cache_size() for s in seq._segments] + [seq._take._cache_size()]
  # 4 buckets per segment; compactions bucket -> smaller or equal bucket after the
  # two exits that can hand on: 2 x (1 + 2 + 3 + 4).
  assert sizes == [4, 4, 4, 20]
  rng = np.random.default_rng(0)
  for n in (1, 3, 8, 5, 13, 2):
    seq(x[rng.choice(len(x), n, replace=False)])
  assert [s._cache_size() for s in seq._segments] + [seq._take._cache_size()] == sizes


def test_predict_reports_the_exit(trained, tmp_path):
  config, model = trained["config"], trained["model"]
  paths = digits_test_files(config, tmp_path, 5)
  out = predict.predict_files(model, paths, topk=3, early_exit=True)
  x, _ = digits_test_images(config, model, 5)
  want = model.early_exit()(x)
  for r, e, label in zip(out, want["exit"], want["label"]):
    assert r["exit"] == EXITS[e] and r["top"][0]["index"] == label
    assert [t["score"] for t in r["top"]] == sorted((t["score"] for t in r["top"]),
                                                    reverse=True)
  with pytest.raises(ValueError, match="--reject_entropy needs class probabilities"):
    predict.predict_files(model, paths, early_exit=True, reject_entropy=1.0)
  assert json.dumps(out)  # what --json prints


def test_config_and_artifact_refusals(trained, tmp_path):
  outputs = ("stem", "stage1", "stage2", "map", "pooled")
  cfg = ml_collections.ConfigDict(dict(exits=("stage2", "stage1"), rule="adaptive"))
  with pytest.raises(ValueError, match="distinct and in forward order"):
    training_lib.check_config(cfg, outputs)
  cfg.exits = ("stage9", "map")
  with pytest.raises(ValueError, match=r"names \['stage9'\].*stem, stage1"):
    training_lib.check_config(cfg, outputs)
  model = trained["model"]
  plain = artifact.export(
      str(tmp_path / "plain"), config=trained["config"], network=model.network,
      class_names=model.class_names, variables=model.variables,
      impostors=model.impostors, sigma=model.sigma)
  with pytest.raises(artifact.ArtifactError, match="has no early exits.*early_exit.exits"):
    artifact.Model(plain).early_exit()


def test_simulate_known_answer():
  # 3 images, 2 classes, 3 exits: image 0 leaves at exit 0 (0.9 > 0.5), image 1 at
  # exit 1 (0.8 > 0.7; exit 0's 0.5 is not > 0.5), image 2 reaches the last exit.
  scores = [np.array([[0.9, 0.1], [0.5, 0.4], [0.2, 0.3]]),
            np.array([[0.0, 1.0], [0.2, 0.8], [0.6, 0.1]]),
            np.array([[1.0, 0.0], [1.0, 0.0], [0.1, 0.2]])]
  out = fit_lib.simulate(scores, np.array([0.5, 0.7, np.inf]))
  np.testing.assert_array_equal(out["exit"], [0, 1, 2])
  np.testing.assert_array_equal(out["label"], [0, 1, 1])


def test_fit_exits_needs_held_out_images():
  features = [np.eye(4, dtype=np.float32)]
  with pytest.raises(ValueError, match="held-out part is empty"):
    fit_lib.fit_exits(("map",), features, np.arange(4), 4, kind="svm", delta=0.5,
                      seed=0, options={})


def test_exit_ce_term_is_the_mean_of_per_exit_cross_entropies():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3, 5)).astype(np.float32)
  labels = np.array([1, 4, 0, 2])
  valid = np.array([True, True, True, False])  # the last row is padding
  term = objectives.make("exit_ce", weight=1.0, input="exit_logits")
  loss, _, metrics = term({"exit_logits": logits},
                          {"label": labels, "valid": valid}, None, None)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  per_exit = -log_p[np.arange(3), :, labels[:3]].mean(0)  # (M,) over the valid rows
  np.testing.assert_allclose(float(loss), per_exit.mean(), rtol=1e-5)
  np.testing.assert_allclose([float(metrics[f"exit{m}_ce"]) for m in range(3)],
                             per_exit, rtol=1e-5)


def test_convnet_exits_fine_tunes_its_exit_heads(tmp_path):
  config = digits_early_exit.get_config()
  config.scheme, config.model.net = "ce", "convnet_exits"
  config.model.exit_stages = EXITS
  config.loss.extra_terms = "exit_ce"
  config.early_exit.exits = ()
  config.train.num_steps, config.num_devices = 30, 1
  config.train.log_every_steps = 1
  config.export.int8_calibration_images = 0
  run = train.Run(config)
  assert run.output_shapes["exit_logits"].shape == (1, 3, 10)
  assert set(EXITS) <= set(run.network.reads)  # cached by head-only runs too
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
          .splitlines()]
  first = [r for r in rows if "exit0_ce" in r][0]
  last = [r for r in rows if "exit0_ce" in r][-1]
  for m in range(3):
    assert last[f"exit{m}_ce"] < 0.7 * first[f"exit{m}_ce"]
  config.model.exit_stages = ()
  with pytest.raises(ValueError, match="needs config.model.exit_stages"):
    train.Run(config)
