"""The RBF-SVM baseline (fgjax/rbf_svm.py): synthetic known answers, its config fields,
and a run that trains nothing and reports the SVM on frozen features."""

import json
import math

import numpy as np
import pytest
from sklearn import svm

from configs import common
from fgjax import config_checks
from fgjax import rbf_svm
from fgjax import train
from fgjax import workdir as workdir_lib
from tests.train_helpers import small_config


def blobs(per_class, seed, centers, noise=0.05):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(len(centers)), per_class)
  centers = np.asarray(centers, float)
  return centers[y] + rng.normal(0, noise, (len(y), centers.shape[1])), y


def circle_xor(n, seed):
  """Points on the unit circle, class 1 in the first and third quadrants: XOR, which no
  linear boundary separates, and already l2-normalised."""
  t = np.random.default_rng(seed).uniform(0, 2 * np.pi, n)
  x = np.stack([np.cos(t), np.sin(t)], axis=1)
  return x, (x[:, 0] * x[:, 1] > 0).astype(int)


def noisy_xor(n, seed):
  """XOR of two signs plus 10 noise dimensions: distances between points are ~2-3, so
  gamma x 1000 of the scale sees every val point as far from all of training (constant
  predictions) and gamma x 0.001 is nearly linear (fails XOR)."""
  rng = np.random.default_rng(seed)
  s = rng.choice([-1.0, 1.0], size=(n, 2))
  x = np.concatenate([s + rng.normal(0, 0.2, (n, 2)), rng.normal(0, 0.5, (n, 10))], 1)
  return x, (s[:, 0] * s[:, 1] > 0).astype(int)


def test_l2_normalize_known_values():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
  np.testing.assert_allclose(rbf_svm.normalize(x, "l2", x),
                             [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])


def test_standardize_uses_the_training_statistics():
  train_x = np.array([[0.0, 5.0], [2.0, 5.0]])  # mean (1, 5), std (1, 0)
  out = rbf_svm.normalize(np.array([[3.0, 7.0], [1.0, 5.0]]), "standardize", train_x)
  # The constant dimension is only centred.
  np.testing.assert_allclose(out, [[2.0, 2.0], [0.0, 0.0]])


def test_unknown_normalization_names_the_field():
  with pytest.raises(ValueError, match=r"config\.eval\.rbf_svm_normalize"):
    rbf_svm.normalize(np.ones((2, 2)), "minmax", np.ones((2, 2)))


def test_gamma_scale_is_scikit_learns_scale():
  assert rbf_svm.gamma_scale(np.array([[0.0, 0.0], [2.0, 2.0]])) == 0.5  # 1 / (2 * 1)
  x, y = blobs(10, 0, [[0, 0, 1], [1, 0, 0], [0, 1, 0]], noise=0.3)
  ours = svm.SVC(kernel="rbf", gamma=rbf_svm.gamma_scale(x)).fit(x, y)
  theirs = svm.SVC(kernel="rbf", gamma="scale").fit(x, y)
  np.testing.assert_allclose(ours.decision_function(x), theirs.decision_function(x))
  with pytest.raises(ValueError, match="the same"):
    rbf_svm.gamma_scale(np.ones((4, 3)))


def test_class_scores_rank_like_predict_with_break_ties_and_absent_classes_last():
  centers = np.eye(6)[:, :5] * 0.6  # five classes and one at the origin, overlapping
  x, y = blobs(20, 1, centers, noise=0.3)
  y = np.where(y == 5, 6, y)  # classes 5 and 7 never appear in training
  model = svm.SVC(kernel="rbf", C=1.0, gamma=2.0, break_ties=True).fit(x, y)
  queries = np.random.default_rng(2).normal(0.3, 0.4, (300, 5))
  scores = rbf_svm.class_scores(model, queries, num_classes=8)
  assert scores.shape == (300, 8)
  assert np.all(np.isneginf(scores[:, [5, 7]])) and np.all(np.isfinite(
      scores[:, [0, 1, 2, 3, 4, 6]]))
  np.testing.assert_array_equal(scores.argmax(axis=1), model.predict(queries))


def test_class_scores_of_two_classes():
  x, y = circle_xor(80, 0)
  model = svm.SVC(kernel="rbf", gamma=4.0).fit(x, y + 1)  # classes 1 and 2 of 3
  scores = rbf_svm.class_scores(model, x, num_classes=3)
  np.testing.assert_array_equal(scores[:, 2], -scores[:, 1])
  assert np.all(np.isneginf(scores[:, 0]))
  np.testing.assert_array_equal(scores.argmax(axis=1), model.predict(x))


def test_separable_blobs_are_classified_perfectly():
  centers = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
  (xt, yt), (xv, yv), (xs, ys) = (blobs(n, s, centers) for n, s in
                                  ((15, 0), (5, 1), (5, 2)))
  norm = lambda a: rbf_svm.normalize(a, "l2", xt)  # noqa: E731
  chosen = rbf_svm.fit_and_select(norm(xt), yt, norm(xv), yv, C_grid=(1.0, 10.0),
                                  gamma_grid=(0.5, 1.0), num_classes=4)
  assert [(r["C"], r["gamma_multiplier"]) for r in chosen.table] == [
      (1.0, 0.5), (1.0, 1.0), (10.0, 0.5), (10.0, 1.0)]
  assert all(r["val_top1"] == 1.0 for r in chosen.table)
  assert (chosen.C, chosen.gamma_multiplier) == (1.0, 0.5)  # ties: first in grid order
  assert chosen.gamma == pytest.approx(0.5 * chosen.gamma_scale)
  scores = rbf_svm.class_scores(chosen.model, norm(xs), 4)
  np.testing.assert_array_equal(scores.argmax(axis=1), ys)


def test_rbf_separates_xor_where_a_linear_svm_cannot():
  (xt, yt), (xv, yv) = circle_xor(200, 0), circle_xor(100, 1)
  linear = svm.SVC(kernel="linear", C=10.0).fit(xt, yt)
  assert np.mean(linear.predict(xv) == yv) < 0.65
  chosen = rbf_svm.fit_and_select(xt, yt, xv, yv, C_grid=(1.0, 10.0, 100.0),
                                  gamma_grid=(0.5, 1.0, 2.0), num_classes=2)
  best = max(r["val_top1"] for r in chosen.table)
  assert best >= 0.97
  first = next(r for r in chosen.table if r["val_top1"] == best)
  assert (chosen.C, chosen.gamma_multiplier) == (first["C"], first["gamma_multiplier"])


def test_val_chooses_the_gamma_between_underfitting_and_overfitting():
  (xt, yt), (xv, yv) = noisy_xor(200, 0), noisy_xor(100, 1)
  chosen = rbf_svm.fit_and_select(xt, yt, xv, yv, C_grid=(10.0,),
                                  gamma_grid=(0.001, 1.0, 1000.0), num_classes=2)
  val = [r["val_top1"] for r in chosen.table]
  assert val[1] == 1.0 and val[0] < 0.6 and val[2] < 0.6
  assert chosen.gamma_multiplier == 1.0
  # gamma x 1000: every val point is far from every support vector, so the decision
  # function is the intercept alone and one class is predicted for all.
  far = svm.SVC(kernel="rbf", C=10.0, gamma=1000.0 * chosen.gamma_scale).fit(xt, yt)
  assert len(set(far.predict(xv))) == 1


def test_grid_errors_and_a_single_point_without_val():
  x, y = blobs(5, 0, [[1, 0], [0, 1]])
  with pytest.raises(ValueError, match="grid is empty"):
    rbf_svm.fit_and_select(x, y, x, y, C_grid=(), gamma_grid=(1.0,), num_classes=2)
  with pytest.raises(ValueError, match="needs a val split"):
    rbf_svm.fit_and_select(x, y, None, None, C_grid=(1.0, 10.0), gamma_grid=(1.0,),
                           num_classes=2)
  chosen = rbf_svm.fit_and_select(x, y, None, None, C_grid=(1.0,), gamma_grid=(2.0,),
                                  num_classes=2)
  assert chosen.C == 1.0 and "val_top1" not in chosen.table[0]


@pytest.mark.parametrize("field, value", [
    ("rbf_svm", "yes"), ("rbf_svm_C_grid", ()), ("rbf_svm_C_grid", (1.0, 0.0)),
    ("rbf_svm_C_grid", (float("nan"),)), ("rbf_svm_C_grid", "1,10"),
    ("rbf_svm_gamma_grid", (-1.0,)), ("rbf_svm_gamma_grid", (True,)),
    ("rbf_svm_normalize", "minmax")])
def test_bad_fields_are_errors_naming_them(field, value):
  config = common.get_config()
  del config.eval[field]  # ConfigDict keeps a field's type; a config built anew need not
  config.eval[field] = value
  with pytest.raises(ValueError, match=rf"config\.eval\.{field}="):
    config_checks.validate(config)


def test_configs_and_workdirs_from_before_the_fields():
  config = common.get_config()
  old = json.loads(json.dumps(config.to_dict()))
  for field in ("rbf_svm", "rbf_svm_C_grid", "rbf_svm_gamma_grid", "rbf_svm_normalize"):
    del config.eval[field]
    del old["eval"][field]
  config_checks.validate(config)  # an old config validates
  new = common.get_config().to_dict()
  new["eval"]["rbf_svm"] = True  # and its workdir may resume with the baseline on
  bad, fine = workdir_lib.config_changes(old, new)
  assert bad == [] and {f for f, _, _ in fine} == {
      "eval.rbf_svm", "eval.rbf_svm_C_grid", "eval.rbf_svm_gamma_grid",
      "eval.rbf_svm_normalize"}


def test_a_run_that_trains_nothing_reports_the_svm_on_frozen_features(tmp_path):
  # The configs/*_rbf_svm.py recipe on digits: no training step, the (randomly
  # initialised, frozen) backbone's cached pooled features, SVM chosen on val.
  config = small_config("ce", steps=0, **{
      "train.num_epochs": 0, "model.trainable": "head", "train.cache_features": True,
      "eval.rbf_svm": True, "eval.rbf_svm_C_grid": (1.0, 100.0),
      "eval.rbf_svm_gamma_grid": (0.5, 2.0), "export.int8_calibration_images": 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == 0
  saved = json.loads((tmp_path / "results.json").read_text())["rbf_svm"]
  assert saved["feature_dim"] == train.Run(config).output_shapes["features"].shape[-1]
  assert [(r["C"], r["gamma_multiplier"]) for r in saved["val_table"]] == [
      (1.0, 0.5), (1.0, 2.0), (100.0, 0.5), (100.0, 2.0)]
  best = max(r["val_top1"] for r in saved["val_table"])
  first = next(r for r in saved["val_table"] if r["val_top1"] == best)
  assert (saved["C"], saved["gamma_multiplier"]) == (first["C"],
                                                     first["gamma_multiplier"])
  assert saved["splits"]["val"]["top1"] == pytest.approx(best)
  test = saved["splits"]["test"]
  assert test["top1"] > 0.5 and test["top5"] >= test["top1"]  # 10 classes: chance 0.1
  assert test["top1_se"] == pytest.approx(
      math.sqrt(test["top1"] * (1 - test["top1"]) / test["num_examples"]))
  preds = np.load(tmp_path / rbf_svm.PREDICTIONS_FILE)
  assert len(preds["test_label"]) == test["num_examples"]
  assert np.mean(preds["test_rbf_svm"] == preds["test_label"]) == pytest.approx(
      test["top1"])
