"""How much of the image ELoPE's boxes keep, over a split (no ground truth needed).

  python benchmarks/box_coverage.py --workdir RUN [--split test] [--batch 32]

RUN is a finished run with an artifact (a localized network: the module's boxes; any
other network: the boxes of its last conv map's channel mean at the config's tau,
ELoPE section 5). Prints the mean box area (fraction of the image), its quartiles, and
the fractions of boxes that cover >= 95% of the image and that are the whole image.
On data sets already cropped to the object (birds525, cars196) a box that keeps the
whole image makes the localization stage a no-op: this tells whether that happened.
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
from fgjax.data import transforms  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default="test")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  model = artifact.Model(os.path.join(args.workdir, "artifact"))
  with open(os.path.join(args.workdir, "artifact", "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  source = getattr(data.get_splits(config.data), args.split)
  size, resize = model.meta["image_size"], model.meta["resize_size"]
  boxes = []
  for start in range(0, len(source), args.batch):
    images = np.stack([
        transforms.eval_transform(source[i]["image"], image_size=size, resize_size=resize)
        for i in range(start, min(start + args.batch, len(source)))])
    boxes.append(model.explain(transforms.normalize(images, model.mean,
                                                    model.std))["box"])
  boxes = np.concatenate(boxes)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  whole = np.all(np.abs(boxes - [0, 0, 1, 1]) < 1e-6, axis=1)
  q1, q2, q3 = np.percentile(area, [25, 50, 75])
  print(f"{args.workdir} ({model.meta['net']}, tau {model.meta['model']['localizer_tau']}),"
        f" {args.split}: {len(boxes)} images; box area mean {area.mean():.3f}, quartiles "
        f"{q1:.3f} / {q2:.3f} / {q3:.3f}; >= 95% of the image: {np.mean(area >= 0.95):.3f};"
        f" the whole image: {whole.mean():.3f}")


if __name__ == "__main__":
  main()
