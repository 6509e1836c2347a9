"""fgjax data layer: sources by name, split rules, transforms and the input pipeline.

  splits = data.get_splits(config.data)
  it = data.make_iterator(splits.train, batch_size=32, train=True, seed=0,
                          image_size=224, resize_size=256, mean=spec.mean,
                          std=spec.std)

Modules, bottom up (none imports a module that imports it back):
  splits.py     Splits, split specifications, class selection, make_splits (NumPy).
  transforms.py decoding, IMAGE_EXTENSIONS, the paper's train / eval transforms.
  records.py    FileSource, ArraySource: the record sources of a split.
  registry.py   register(name), source_names(), get_splits(cfg).
  folder.py     'image_folder', 'birds525', 'cars196' (class or split folders).
  digits.py     'digits' (scikit-learn).
  tfds.py       'tfds' (tfds.data_source, no TensorFlow).
  pipeline.py   make_iterator, steps_per_epoch.

Config fields (`config.data`; bad values raise ValueError naming the field):
  source: a registered name: 'image_folder' | 'birds525' | 'cars196' | 'digits' |
    'tfds' (source_names()).
  root: image folder, `<root>/<class>/<image>` or split folders
    `<root>/{train,val,test}/<class>/<image>` (image_folder); the birds525 / cars196
    folder (empty: ../shared/data/<name> next to the repo, else next to cwd).
  split: 'canonical' (class folders: birds525 numbering 1-3 / 4 / 5; split folders:
    the folders; 60/20/20 stratified for digits; the data set's own splits for
    tfds), per-class counts 'train:3,val:1,test:1', or per-class fractions
    'train:0.6,val:0.2,test:0.2' (train and test required; val optional ->
    splits.val is None; split folders are pooled per class and re-split; not for
    tfds).
  seed: int; shuffles each class before a counts / fractions split (and the
    train / val carve-out of tfds data sets without a validation split).
  tfds_name: e.g. 'caltech_birds2011', 'cars196', 'stanford_dogs',
    'oxford_flowers102' (source='tfds').
  tfds_data_dir: prepared TFDS data (ArrayRecord); empty: $TFDS_DATA_DIR or
    ~/tensorflow_datasets. Nothing is downloaded during training.
  bbox_crop: bool; crop to the TFDS bounding box before resizing (Birds, Cars).
  classes_subset: class indices (sorted class order) to use; empty: all. Every
    source.
  holdout_classes: class indices held out as "unknown" (open-set evaluation):
    the known classes are re-indexed 0..K-1 and `splits.unknown` holds the test
    images of the held-out ones with label -1. Every source.
  unknown_root: unknown images for open-set evaluation from another data set (the
    paper's section 4.2 protocol): a registered source name (its test split, e.g.
    'birds525' for a cars196 run) or any folder of images; becomes `splits.unknown`
    (label -1). Not together with holdout_classes. Every source.
  val_fraction: (tfds only, optional, default 0.1) share of train carved out as
    val when the data set has no validation split.
  validate: (optional, default True) fully decode every image-folder file once
    when the source is built and drop undecodable ones (listed in a warning and in
    `source.bad_files`).
Input fields used by the trainer and passed to make_iterator: image_size,
resize_size, flip, worker_count; mean / std come from the backbone.
"""

# Importing the source modules registers their sources.
from fgjax.data import digits as _digits  # noqa: F401
from fgjax.data import folder as _folder  # noqa: F401
from fgjax.data import tfds as _tfds  # noqa: F401
from fgjax.data.pipeline import make_iterator
from fgjax.data.pipeline import steps_per_epoch
from fgjax.data.records import ArraySource
from fgjax.data.records import FileSource
from fgjax.data.unknown import get_splits
from fgjax.data.registry import register
from fgjax.data.registry import source_names
from fgjax.data.splits import Splits
from fgjax.data.tfds import TfdsDataMissingError
from fgjax.data.transforms import IMAGE_EXTENSIONS

__all__ = ["ArraySource", "FileSource", "IMAGE_EXTENSIONS", "Splits", "get_splits",
           "make_iterator", "register", "source_names", "steps_per_epoch",
           "TfdsDataMissingError"]
