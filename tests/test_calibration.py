"""fgjax.calibration: ECE and NLL known answers, temperature scaling recovers a known
temperature, sigma by NLL, and the reliability diagram of a run."""

import json

import numpy as np
import pytest

from fgjax import calibration
from fgjax import evaluate
from fgjax import impostors as impostors_lib
from fgjax import train
from tests.train_helpers import small_config


def test_reliability_known_answer():
  # Confidences 0.9, 0.9 (one right), 0.6 (right), 0.3 of 3 classes (wrong), 4 bins:
  # bin (0.75, 1]: acc 0.5, conf 0.9; bin (0.5, 0.75]: acc 1, conf 0.6;
  # bin (0.25, 0.5]: acc 0, conf ~0.34 (the top class of a near-uniform row).
  probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1],
                    [0.34, 0.33, 0.33]])
  labels = np.array([0, 1, 0, 2])
  report = calibration.reliability(np.log(probs), labels, num_bins=4)
  want = (2 / 4) * abs(0.5 - 0.9) + (1 / 4) * abs(1 - 0.6) + (1 / 4) * abs(0 - 0.34)
  assert report["ece"] == pytest.approx(want)
  assert [b["count"] for b in report["bins"]] == [0, 1, 1, 2]
  assert report["bins"][0]["accuracy"] is None
  assert report["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.05, 0.6, 0.33])))


def test_perfectly_calibrated_predictions_have_small_ece():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(20000, 5)) * 2
  log_p = calibration.log_softmax(logits)
  labels = np.array([rng.choice(5, p=np.exp(row)) for row in log_p])
  assert calibration.reliability(log_p, labels)["ece"] < 0.02
  # The same predictions made three times too confident are badly calibrated.
  assert calibration.reliability(calibration.log_softmax(logits * 3), labels)["ece"] > 0.1


def test_temperature_scaling_recovers_the_temperature():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8000, 10)) * 3
  labels = np.array([rng.choice(10, p=np.exp(row))
                     for row in calibration.log_softmax(z, 2.5)])
  t = calibration.fit_temperature(z, labels)
  assert t == pytest.approx(2.5, rel=0.08)
  assert calibration.nll(calibration.log_softmax(z, t), labels) < \
      calibration.nll(calibration.log_softmax(z), labels)


def test_sigma_by_nll_is_the_grid_argmin():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(30, 4)).astype(np.float32)
  imps = impostors_lib.ImpostorSet(centers, np.arange(30, dtype=np.int32) % 3)
  queries = centers + 0.3 * rng.normal(size=centers.shape).astype(np.float32)
  labels = np.arange(30) % 3
  grid = (0.1, 0.3, 1.0, 3.0)
  sigma, table = evaluate.select_sigma(queries, labels, imps, grid, 3, "nll")
  nlls = {s: calibration.nll(evaluate.rbf_log_probs(queries, imps, s, 3), labels)
          for s in grid}
  assert sigma == min(nlls, key=nlls.get)
  assert table == {repr(s): pytest.approx(v) for s, v in nlls.items()}
  with pytest.raises(ValueError, match="sigma_criterion='ece'"):
    evaluate.select_sigma(queries, labels, imps, grid, 3, "ece")


def test_run_reports_calibration_and_draws_the_diagram(tmp_path):
  config = small_config("ce", steps=20, **{"export.int8_calibration_images": 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  test = results["splits"]["test"]["calibration"]
  assert set(test) == {"softmax", "softmax_temperature"}
  assert results["temperature"] > 0
  # Temperature scaling is fitted on val to lower the NLL; on test it should not be
  # much worse than the raw softmax.
  assert test["softmax_temperature"]["nll"] <= test["softmax"]["nll"] + 0.05
  assert (tmp_path / "reliability.png").stat().st_size > 5000
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["splits"]["test"]["calibration"]["softmax"]["ece"] == test["softmax"]["ece"]
