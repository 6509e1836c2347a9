"""ELoPE localization: boxes from heat maps, batched crops, IoU, the localized network."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import birds_fixed
from configs import common
from fgjax import data
from fgjax import evaluate_run
from fgjax import train
from fgjax.data import transforms
from fgjax.models import localize
from fgjax.models import nets
from tests.train_helpers import read_rows
from tests.train_helpers import restored
from tests.train_helpers import small_config


def _map(rows, cols, cells, value=1.0, base=0.0):
  m = np.full((rows, cols), base, np.float32)
  for i, j in cells:
    m[i, j] = value
  return m


def test_boxes_of_known_rectangles():
  block = _map(7, 7, [(i, j) for i in range(2, 5) for j in range(1, 4)])
  one = _map(7, 7, [(6, 0)])
  corners = _map(7, 7, [(0, 6), (5, 2)])  # the rectangle spans both cells
  constant = np.full((7, 7), 3.0, np.float32)
  got = np.asarray(jax.jit(localize.heatmap_boxes, static_argnums=1)(
      jnp.asarray(np.stack([block, one, corners, constant])), 0.3))
  np.testing.assert_allclose(got, [[2 / 7, 1 / 7, 5 / 7, 4 / 7],
                                   [6 / 7, 0.0, 1.0, 1 / 7],
                                   [0.0, 2 / 7, 6 / 7, 1.0],
                                   [0.0, 0.0, 1.0, 1.0]], atol=1e-6)


def test_threshold_is_strict_and_min_max_normalised():
  # Values 0, 5, 10: normalised 0, 0.5, 1. tau = 0.5 keeps only the 10 (strictly above).
  m = _map(4, 6, [(1, 1)], value=5.0) + _map(4, 6, [(2, 4)], value=10.0) + 100.0
  box = np.asarray(localize.heatmap_boxes(jnp.asarray(m[None]), 0.5))[0]
  np.testing.assert_allclose(box, [2 / 4, 4 / 6, 3 / 4, 5 / 6], atol=1e-6)
  box = np.asarray(localize.heatmap_boxes(jnp.asarray(m[None]), 0.49))[0]
  np.testing.assert_allclose(box, [1 / 4, 1 / 6, 3 / 4, 5 / 6], atol=1e-6)
  with pytest.raises(ValueError, match="tau=1.0"):
    localize.heatmap_boxes(jnp.asarray(m[None]), 1.0)


def test_crop_samples_the_box_at_pixel_centres():
  h, w = 40, 60
  yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  image = np.stack([yy, xx, yy + xx], -1).astype(np.float32)  # linear: bilinear is exact
  boxes = np.array([[0.25, 0.5, 0.75, 1.0], [0.1, 0.0, 0.3, 0.2]], np.float32)
  out = np.asarray(jax.jit(lambda i, b: localize.crop_and_resize(i, b, (30, 45)))(
      jnp.asarray(np.stack([image, image])), jnp.asarray(boxes)))
  assert out.shape == (2, 30, 45, 3)
  for n, (y0, x0, y1, x1) in enumerate(boxes):
    r = y0 * h + (np.arange(30) + 0.5) * (y1 - y0) * h / 30
    c = x0 * w + (np.arange(45) + 0.5) * (x1 - x0) * w / 45
    inner = (slice(2, -2), slice(2, -2))  # edge pixels clamp at the image border
    np.testing.assert_allclose(out[n, ..., 0][inner], np.repeat(r[:, None], 45, 1)[inner],
                               atol=1e-3)
    np.testing.assert_allclose(out[n, ..., 1][inner], np.repeat(c[None], 30, 0)[inner],
                               atol=1e-3)


def test_iou_and_localization_accuracy():
  a = jnp.asarray([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]])
  b = jnp.asarray([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])
  # 0.0625 / (0.25 + 0.25 - 0.0625); 0.5 / 1; disjoint.
  np.testing.assert_allclose(localize.box_iou(a, b), [0.0625 / 0.4375, 0.5, 0.0],
                             rtol=1e-6)
  assert localize.localization_accuracy(a, b) == pytest.approx(1 / 3)
  assert localize.localization_accuracy(a, a) == 1.0


def _localized(backbone="small_cnn", **kw):
  c = common.get_config().model
  c.update(dict(backbone=backbone, pretrained=False, net="elope_localized",
                pooling="kmax", pooling_k=2, embed_dim=16, **kw))
  return nets.build(c, num_classes=5)


def test_localizer_starts_as_the_classifiers_first_blocks():
  network = _localized(localizer_stop="stage1", localizer_size=16, localizer_map_size=4)
  v = network.init(0, 32)
  assert sorted(v["params"]["localizer"]) == ["stage0", "stage1"]
  for c in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, v[c]["localizer"],
                 {k: v[c]["backbone"][k] for k in ("stage0", "stage1")})
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  out = network.module.apply(v, x)
  assert out["heatmap"].shape == (3, 4, 4) and out["box"].shape == (3, 4)
  assert out["heatmap_target"].shape == out["map"].shape[:3] == (3, 8, 8)
  # The crop goes through the classifier: 'map' is the crop's, the target the image's.
  full = network.module.apply(v, x, method="trunk")
  np.testing.assert_allclose(out["map"], full["map"], rtol=1e-5, atol=1e-5)
  # A crop of the whole image is the image itself (up to resampling).
  crop = localize.crop_and_resize(x, jnp.tile(jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), (3, 1)),
                                  (32, 32))
  np.testing.assert_allclose(crop, x, atol=1e-5)


def test_resnet50_localizer_size_matches_the_paper():
  # ELoPE section 5: stem and first residual stage of ResNet-50, "only 220000 parameters".
  network = _localized("resnet50", localizer_stop="stage1", localizer_map_size=14)
  shapes = jax.eval_shape(lambda: network.init(0, 448))
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]["localizer"]))
  assert 215_000 < n < 230_000, n


def _digits(steps, **overrides):
  return small_config("ce", steps=steps, **{
      "model.net": "elope", "model.pooling": "kmax", "model.pooling_k": 2,
      "loss.extra_terms": "elope", "model.localizer_stop": "stem",
      "model.localizer_size": 8, "model.localizer_map_size": 4, **overrides})


def test_elope_recipe_trains_the_module_and_draws_it(tmp_path):
  train.train_and_evaluate(_digits(20), str(tmp_path / "classifier"))
  stage2 = _digits(40, **{
      "model.net": "elope_localized", "loss.terms": "heatmap", "loss.extra_terms": "",
      "model.trainable": "head", "model.frozen": "embed,classifier",
      "init_from": str(tmp_path / "classifier"), "eval.localization": True,
      "train.log_every_steps": 1})
  results = train.train_and_evaluate(stage2, str(tmp_path / "module"))
  losses = [r["heatmap_loss"] for r in read_rows(tmp_path / "module")]
  assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  # Only the module trained: the classifier is the stage-1 one, bit for bit.
  _, src = restored(tmp_path / "classifier", _digits(20))
  _, state = restored(tmp_path / "module", stage2)
  for group in ("backbone", "embed", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, state.params["net"][group],
                 src.params["net"][group])
  loc = results["localization"]
  assert loc["num_examples"] == 357 and "no ground-truth boxes" in loc["accuracy"]
  assert (tmp_path / "module" / "localization.png").stat().st_size > 5000
  assert json.loads((tmp_path / "module" / "results.json").read_text())[
      "splits"]["test"]["softmax"]["top1"] > 0.1


def test_localization_accuracy_against_tfds_boxes(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS sources need it")
  config = birds_fixed.get_config()
  config.scheme, config.model.net, config.model.pooling = "ce", "elope", "kmax"
  config.model.pooling_k = 2  # SqueezeNet's map is 3x3 at 64 px
  config.model.pretrained, config.data.bbox_crop = False, False
  config.input.image_size, config.input.resize_size = 64, 72
  config.train.batch_size = config.eval.batch_size = 4
  config.train.num_steps, config.num_devices = 2, 1
  config.eval.localization = True
  with tfds.testing.mock_data(num_examples=12):
    splits = data.get_splits(config.data)
    assert splits.test.has_boxes
    results = train.train_and_evaluate(config, str(tmp_path))
    raw = [splits.test[i] for i in range(len(splits.test))]
    run = train.Run(config)
    _, state = restored(tmp_path, run)
    out = run.outputs.outputs(state.variables(), "test", ("mean_map",), from_images=True)
  truth = np.stack([transforms.eval_box(r["box"], image_size=64, resize_size=72)
                    for r in raw])
  np.testing.assert_allclose(out["true_box"], truth, atol=1e-6)
  want = evaluate_run.localization(out, tau=config.model.localizer_tau)
  boxes = localize.heatmap_boxes(jnp.asarray(out["mean_map"]), config.model.localizer_tau)
  iou = np.asarray(localize.box_iou(boxes, jnp.asarray(truth)))
  assert want["mean_map_iou50"] == pytest.approx(float(np.mean(iou >= 0.5)))
  assert results["localization"]["mean_map_iou50"] == pytest.approx(want["mean_map_iou50"])


def test_eval_box_follows_resize_and_centre_crop():
  # Resize to 256, crop 224 from offset 16: y' = (256 y - 16) / 224.
  box = transforms.eval_box([0.5, 0.0, 1.0, 0.25], image_size=224, resize_size=256)
  np.testing.assert_allclose(box, [(128 - 16) / 224, 0.0, 1.0, (64 - 16) / 224], atol=1e-6)


def test_localization_report_box_area_without_ground_truth():
  heat = np.zeros((2, 4, 4), np.float32)
  heat[0] = 1.0                  # flat map: every cell on -> the whole image
  heat[0, 0, 0] = 0.0            # ... except that min-max needs a low cell: still all
  heat[1, 1:3, 2] = 1.0          # a 2 x 1 block of a 4 x 4 map -> area 2/16
  module = np.array([[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.5]], np.float32)
  report = evaluate_run.localization({"mean_map": heat, "box": module}, tau=0.5)
  assert report["accuracy"] == "no ground-truth boxes in this split's source"
  assert report["module_area"] == pytest.approx((1.0 + 0.5 * 0.25) / 2)
  assert report["module_whole"] == 0.5
  assert report["mean_map_whole"] == 0.5
  assert report["mean_map_area"] == pytest.approx((1.0 + 2 / 16) / 2)
