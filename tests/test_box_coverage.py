"""benchmarks/box_coverage.py's paste: the true boxes it makes for localization IoU."""

import numpy as np
import pytest

from benchmarks import box_coverage
from fgjax.data import transforms
from fgjax.models import localize


def test_paste_puts_each_shrunk_image_inside_its_box_on_the_fill():
  rng = np.random.default_rng(3)
  images = rng.integers(1, 255, size=(5, 20, 20, 3), dtype=np.uint8)
  fill = (10.0, 20.0, 30.0)
  canvases, boxes = box_coverage.paste(images, 0.5, np.random.default_rng(0), fill)
  assert canvases.shape == (5, 20, 20, 3) and canvases.dtype == np.float32
  assert boxes.shape == (5, 4)
  np.testing.assert_allclose(boxes[:, 2:] - boxes[:, :2], 0.5)  # 10 of 20 pixels
  assert np.all(boxes >= 0) and np.all(boxes <= 1)
  for canvas, image, box in zip(canvases, images, boxes):
    top, left = (box[:2] * 20).round().astype(int)
    np.testing.assert_array_equal(canvas[top:top + 10, left:left + 10],
                                  transforms.resize(image, 10))
    outside = np.ones((20, 20), bool)
    outside[top:top + 10, left:left + 10] = False
    np.testing.assert_array_equal(canvas[outside], np.broadcast_to(fill, (300, 3)))
  # The seed decides the places: the same seed, the same boxes; five draws differ.
  _, again = box_coverage.paste(images, 0.5, np.random.default_rng(0), fill)
  np.testing.assert_array_equal(boxes, again)
  assert len({tuple(b) for b in boxes}) > 1


def test_a_perfect_localizer_scores_one_and_the_whole_image_scores_the_area():
  images = np.zeros((4, 16, 16, 3), np.uint8)
  _, boxes = box_coverage.paste(images, 0.5, np.random.default_rng(1), (0, 0, 0))
  assert localize.localization_accuracy(boxes, boxes) == 1.0
  whole = np.tile(np.float32([0, 0, 1, 1]), (4, 1))
  np.testing.assert_allclose(localize.box_iou(whole, boxes), 0.25)  # 8x8 of 16x16
  assert localize.localization_accuracy(whole, boxes) == 0.0


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_paste_refuses_a_scale_outside_0_1(scale):
  with pytest.raises(ValueError, match="paste_scale"):
    box_coverage.paste(np.zeros((1, 8, 8, 3), np.uint8), scale,
                       np.random.default_rng(0), (0, 0, 0))
