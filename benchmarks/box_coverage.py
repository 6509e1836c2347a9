"""Where ELoPE's boxes go over a split, and, on images pasted onto a larger canvas
(a known box), whether they find the object.

  python benchmarks/box_coverage.py --workdir RUN [--split test] [--batch 32]
  python benchmarks/box_coverage.py --workdir RUN --paste_scale 0.5

RUN is a finished run with an artifact (a localized network: the module's boxes; any
other network: the boxes of its last conv map's channel mean at the config's tau,
ELoPE section 5). Prints the mean box area (fraction of the image), its quartiles, and
the fractions of boxes that cover >= 95% of the image and that are the whole image.
On data sets already cropped to the object (birds525, cars196) a box that keeps the
whole image makes the localization stage a no-op: this tells whether that happened.

Neither folder data set has ground-truth boxes, so --paste_scale S makes some: each
evaluation image is shrunk to S of its side and pasted at a seeded random place on a
canvas of the backbone's mean colour (0 after normalisation), and the pasted square is
the true box. It then also prints ELoPE Table 4's measure (the fraction of boxes with
IoU >= 0.5) and the mean IoU, and top-1 on the canvases (a localized network crops to
its own box first), on the canvases cropped to the network's own boxes (networks
without a module: ELoPE's crop from the classifier's own map, two passes), and on the
canvases cropped to the true box (what a perfect localizer would give this
classifier). A proxy: the background is flat, and the
classifier and module never saw one in training.
"""

import argparse
import json
import os
import sys

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax import artifact  # noqa: E402
from fgjax import data  # noqa: E402
from fgjax import visualize  # noqa: E402
from fgjax.data import transforms  # noqa: E402
from fgjax.models import localize  # noqa: E402


def paste(images: np.ndarray, scale: float, rng: np.random.Generator,
          fill) -> tuple[np.ndarray, np.ndarray]:
  """(N, S, S, 3) uint8 images, each shrunk to round(scale * S) and pasted at a random
  place of an (S, S, 3) canvas of colour `fill`: (canvases float32, (N, 4) normalised
  true boxes (ymin, xmin, ymax, xmax))."""
  n, side = images.shape[0], images.shape[1]
  small = int(round(scale * side))
  if not 0 < small <= side:
    raise ValueError(f"--paste_scale={scale} must lie in (0, 1].")
  canvases = np.broadcast_to(np.asarray(fill, np.float32), images.shape).copy()
  corners = rng.integers(0, side - small + 1, size=(n, 2))
  for canvas, image, (top, left) in zip(canvases, images, corners):
    canvas[top:top + small, left:left + small] = transforms.resize(image, small)
  boxes = np.concatenate([corners, corners + small], axis=1) / side
  return canvases, boxes.astype(np.float32)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default="test")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--paste_scale", type=float, default=0.0,
                      help="Paste each image at this fraction of its side onto a canvas "
                           "(0: the images as they are, no ground truth).")
  parser.add_argument("--seed", type=int, default=0, help="Where the pastes go.")
  parser.add_argument("--png", default="", help="Draw the first 8 images, heat maps, "
                      "boxes (and true boxes when pasted) to this PNG.")
  args = parser.parse_args()
  model = artifact.Model(os.path.join(args.workdir, "artifact"))
  with open(os.path.join(args.workdir, "artifact", "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  source = getattr(data.get_splits(config.data), args.split)
  size, resize = model.meta["image_size"], model.meta["resize_size"]
  rng = np.random.default_rng(args.seed)
  # A localized network crops to its module's box inside log_probs already.
  crops_itself = "heatmap" in model.network.output_shapes(size)
  boxes, truth, hits = [], [], {}
  for start in range(0, len(source), args.batch):
    index = range(start, min(start + args.batch, len(source)))
    images = np.stack([transforms.eval_transform(source[i]["image"], image_size=size,
                                                 resize_size=resize) for i in index])
    if args.paste_scale:
      labels = np.asarray([source[i]["label"] for i in index])
      images, true_box = paste(images, args.paste_scale, rng, model.mean)
      truth.append(true_box)
    x = transforms.normalize(images, model.mean, model.std)
    looks = model.explain(x)
    boxes.append(looks["box"])
    if args.png and start == 0:
      visualize.heatmap_grid(args.png, np.asarray(images[:8]).astype(np.uint8),
                             looks["heatmap"][:8], looks["box"][:8],
                             truth[0][:8] if truth else None)
    if args.paste_scale:
      inputs = {"canvas": x, "true_box": localize.crop_and_resize(x, true_box, (size, size))}
      if not crops_itself:
        inputs["own_box"] = localize.crop_and_resize(x, boxes[-1], (size, size))
      for name, batch in inputs.items():
        hits[name] = hits.get(name, 0) + int(np.sum(
            model.log_probs(np.asarray(batch)).argmax(-1) == labels))
  boxes = np.concatenate(boxes)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  whole = np.all(np.abs(boxes - [0, 0, 1, 1]) < 1e-6, axis=1)
  q1, q2, q3 = np.percentile(area, [25, 50, 75])
  pasted = f", pasted at {args.paste_scale:g} of the side" if args.paste_scale else ""
  print(f"{args.workdir} ({model.meta['net']}, tau {model.meta['model']['localizer_tau']}),"
        f" {args.split}{pasted}: {len(boxes)} images; box area mean {area.mean():.3f}, "
        f"quartiles {q1:.3f} / {q2:.3f} / {q3:.3f}; >= 95% of the image: "
        f"{np.mean(area >= 0.95):.3f}; the whole image: {whole.mean():.3f}")
  if args.paste_scale:
    truth = np.concatenate(truth)
    iou = np.asarray(localize.box_iou(boxes, truth))
    # A systematic shift of the boxes shows here (e.g. a map misaligned with the input).
    shift = ((boxes[:, :2] + boxes[:, 2:]) - (truth[:, :2] + truth[:, 2:])).mean(0) / 2
    top1 = {k: f"{v / len(boxes):.4f}" for k, v in hits.items()}
    print(f"IoU >= 0.5: {np.mean(iou >= 0.5):.3f}, mean IoU {iou.mean():.3f}; mean box "
          f"centre minus true centre (y, x): ({shift[0]:+.3f}, {shift[1]:+.3f}); top-1 on "
          f"the canvases (a localized network: cropped to its module's box) and on "
          f"crops to the boxes: {top1}")


if __name__ == "__main__":
  main()
