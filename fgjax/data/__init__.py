"""fgjax data layer: sources, transforms and the input pipeline.

  splits = data.get_splits(config.data)
  it = data.make_iterator(splits.train, batch_size=32, train=True, seed=0,
                          image_size=224, resize_size=256, mean=spec.mean,
                          std=spec.std)

Config fields (`config.data`; bad values raise ValueError naming the field):
  source: 'image_folder' | 'birds525' | 'tfds' | 'digits'.
  root: image folder `<root>/<class>/<image>` (image_folder), or the birds525
    folder (empty: ../shared/data/birds525 next to the repo, else next to cwd).
  split: 'canonical' (birds525 numbering 1-3 / 4 / 5 for folders; 60/20/20
    stratified for digits; the data set's own splits for tfds), per-class counts
    'train:3,val:1,test:1', or per-class fractions 'train:0.6,val:0.2,test:0.2'
    (train and test required; val optional -> splits.val is None).
  seed: int; shuffles each class before a counts / fractions split (and the
    train / val carve-out of tfds data sets without a validation split).
  tfds_name: e.g. 'caltech_birds2011', 'cars196', 'stanford_dogs',
    'oxford_flowers102' (source='tfds').
  tfds_data_dir: prepared TFDS data (ArrayRecord); empty: $TFDS_DATA_DIR or
    ~/tensorflow_datasets. Nothing is downloaded during training.
  bbox_crop: bool; crop to the TFDS bounding box before resizing (Birds, Cars).
  classes_subset: class indices (sorted folder order) to use; empty: all.
  holdout_classes: class indices held out as "unknown" (open-set evaluation):
    the known classes are re-indexed 0..K-1 and `splits.unknown` holds the test
    images of the held-out ones with label -1.
  val_fraction: (tfds only, optional, default 0.1) share of train carved out as
    val when the data set has no validation split.
  validate: (optional, default True) fully decode every image-folder file once
    when the source is built and drop undecodable ones (listed in a warning and in
    `source.bad_files`).
Input fields used by the trainer and passed to make_iterator: image_size,
resize_size, flip, worker_count; mean / std come from the backbone.
"""

from fgjax.data.pipeline import make_iterator
from fgjax.data.pipeline import steps_per_epoch
from fgjax.data.sources import ArraySource
from fgjax.data.sources import FileSource
from fgjax.data.sources import get_splits
from fgjax.data.sources import Splits
from fgjax.data.tfds_sources import TfdsDataMissingError

__all__ = ["ArraySource", "FileSource", "Splits", "get_splits", "make_iterator",
           "steps_per_epoch", "TfdsDataMissingError"]
