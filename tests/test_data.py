"""Tests for fgjax.data: decoding, splits, sources and the input pipeline."""

import pathlib
import warnings

import numpy as np
from PIL import Image
import pytest
from sklearn import datasets

from fgjax import data
from fgjax.data import digits
from fgjax.data import folder
from fgjax.data import pipeline
from fgjax.data import splits as splits_lib
from fgjax.data import transforms
from tests.data_helpers import data_config
from tests.data_helpers import make_folder
from tests.data_helpers import rgb


# ---- transforms ----------------------------------------------------------------------
def test_decode_modes_to_rgb(tmp_path):
  gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  Image.fromarray(gray, "L").save(tmp_path / "l.png")
  np.testing.assert_array_equal(transforms.decode_image(tmp_path / "l.png"),
                                np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb(1, 6, 8), np.full((6, 8, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  over_white = rgba[..., :3] * (7 / 255) + 255 * (1 - 7 / 255)  # Alpha over white.
  np.testing.assert_allclose(transforms.decode_image(tmp_path / "a.png"), over_white,
                             atol=1)
  # CMYK (0, 0, 0, 0) is white and (0, 255, 255, 0) pure cyan... red: C=0, M=255, Y=255.
  cmyk = np.zeros((4, 4, 4), np.uint8)
  cmyk[:2] = (0, 255, 255, 0)
  Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
  out = transforms.decode_image(tmp_path / "c.jpg")
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[3, 3].min() > 200
  pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.info["transparency"] = 1
  pal.save(tmp_path / "p.png")
  # Index 1 is transparent, so it shows the white background, not its blue entry.
  np.testing.assert_array_equal(transforms.decode_image(tmp_path / "p.png"),
                                [[[255, 0, 0], [255] * 3], [[255] * 3, [255, 0, 0]]])


def test_decode_rejects_truncated_and_garbage(tmp_path):
  Image.fromarray(rgb(0, 64, 64)).save(tmp_path / "ok.jpg", quality=90)
  raw = (tmp_path / "ok.jpg").read_bytes()
  assert transforms.decode_image(raw).shape == (64, 64, 3)
  with pytest.raises(OSError):
    transforms.decode_image(raw[:len(raw) // 2])  # LOAD_TRUNCATED_IMAGES stays off.
  with pytest.raises(Exception):
    transforms.decode_image(b"definitely not an image")


def test_resize_crop_normalize_against_numpy():
  img = rgb(3, 9, 7)
  assert transforms.resize(img, 5).shape == (5, 5, 3)
  big = np.repeat(np.repeat(img, 2, 0), 2, 1)  # 18 x 14
  np.testing.assert_array_equal(transforms.center_crop(big, 4), big[7:11, 5:9])
  np.testing.assert_array_equal(transforms.eval_transform(img, image_size=3, resize_size=3),
                                transforms.resize(img, 3))
  x = np.float32(big)
  np.testing.assert_allclose(transforms.normalize(big, (1, 2, 3), (2, 4, 8)),
                             (x - [1, 2, 3]) / np.float32([2, 4, 8]), rtol=1e-6)


def test_train_transform_is_a_window_or_its_mirror():
  # Pixel values encode their position, so a crop reveals its offset.
  yy, xx = np.mgrid[0:8, 0:8]
  img = np.stack([yy * 10, xx * 10, np.zeros_like(yy)], -1).astype(np.uint8)
  seen_flip = set()
  for s in range(20):
    out = transforms.train_transform(img, image_size=5, resize_size=8, flip=True,
                                     rng=np.random.default_rng(s))
    top, left = out[0, :, 0].min() // 10, out[0, :, 1].min() // 10
    window = img[top:top + 5, left:left + 5]
    flipped = not np.array_equal(out, window)
    if flipped:
      np.testing.assert_array_equal(out, window[:, ::-1])
    seen_flip.add(flipped)
    again = transforms.train_transform(img, image_size=5, resize_size=8, flip=True,
                                       rng=np.random.default_rng(s))
    np.testing.assert_array_equal(out, again)
  assert seen_flip == {True, False}


def test_crop_box_known_answer():
  img = rgb(0, 10, 20)
  np.testing.assert_array_equal(transforms.crop_box(img, (0.2, 0.25, 0.6, 0.5)),
                                img[2:6, 5:10])
  assert transforms.crop_box(img, (1.0, 1.0, 1.0, 1.0)).shape == (1, 1, 3)
  np.testing.assert_allclose(transforms.union_bbox([[0.1, 0.2, 0.3, 0.4],
                                                    [0.0, 0.3, 0.2, 0.9]]),
                             [0.0, 0.2, 0.3, 0.9])


# ---- image folders -------------------------------------------------------------------
def test_image_folder_bad_files_and_modes(tmp_path):
  root = tmp_path / "data"
  (root / "a_gray").mkdir(parents=True)
  (root / "b_rgba").mkdir()
  (root / "c_cmyk").mkdir()
  (root / ".hidden_class").mkdir()
  (root / "b_rgba" / ".nested_hidden").mkdir()
  for n in range(1, 6):
    Image.fromarray(rgb(n)[..., 0], "L").save(root / "a_gray" / f"{n}.png")
    Image.fromarray(np.concatenate([rgb(n), rgb(n)[..., :1]], -1), "RGBA").save(
        root / "b_rgba" / f"{n}.png")
    Image.fromarray(np.concatenate([rgb(n), rgb(n)[..., :1]], -1), "CMYK").save(
        root / "c_cmyk" / f"{n}.jpg")
    Image.fromarray(rgb(n)).save(root / ".hidden_class" / f"{n}.png")
    Image.fromarray(rgb(n)).save(root / "b_rgba" / ".nested_hidden" / f"{n}.png")
  Image.fromarray(rgb(0, 64, 64)).save(root / "a_gray" / "4.jpg", quality=90)
  (root / "a_gray" / "4.png").unlink()
  raw = (root / "a_gray" / "4.jpg").read_bytes()
  (root / "a_gray" / "4.jpg").write_bytes(raw[:len(raw) // 2])      # Truncated.
  (root / "c_cmyk" / "5.jpg").write_bytes(b"garbage, not a JPEG")   # Garbage bytes.
  (root / "c_cmyk" / "notes.txt").write_text("ignored")             # Not an image.
  with pytest.warns(RuntimeWarning, match="dropped 2 of 15 files"):
    splits = data.get_splits(data_config(root=str(root)))
  assert splits.class_names == ["a_gray", "b_rgba", "c_cmyk"]
  assert splits.num_classes == 3
  bad = sorted(b.split(": ")[0] for b in splits.train.bad_files)
  assert bad == [str(root / "a_gray" / "4.jpg"), str(root / "c_cmyk" / "5.jpg")]
  assert len(splits.train) == 9 and len(splits.val) == 2 and len(splits.test) == 2
  for i in range(len(splits.train)):
    rec = splits.train[i]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (12, 10, 3)
    assert rec["index"] == i
  np.testing.assert_array_equal(splits.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(splits.train[0]["image"][..., 1], rgb(1)[..., 0])


def test_runtime_decode_failure_is_substituted(tmp_path):
  root = make_folder(tmp_path / "d", num_classes=2)
  splits = data.get_splits(data_config(root=str(root)))
  path = pathlib.Path(splits.train.paths[1])
  path.write_bytes(b"corrupted after the source was built")
  with pytest.warns(RuntimeWarning, match="cannot decode"):
    rec = splits.train[1]
  assert rec["index"] == 2 and rec["valid"] is False
  np.testing.assert_array_equal(rec["image"], splits.train[2]["image"])
  assert splits.train.read_failures == [str(path)]
  with pytest.warns(RuntimeWarning):
    batch = next(data.make_iterator(splits.train, batch_size=3, train=False, seed=0,
                                    image_size=8, resize_size=12, mean=(0,), std=(1,),
                                    process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["valid"], [True, False, True])


def test_image_folder_counts_split_and_holdout(tmp_path):
  root = make_folder(tmp_path / "d", num_classes=4, per_class=6)
  splits = data.get_splits(data_config(root=str(root), split="train:3,val:1,test:2", seed=5,
                                holdout_classes=(1,)))
  assert splits.class_names == ["class_00", "class_02", "class_03"]
  assert splits.unknown_class_names == ["class_01"]
  np.testing.assert_array_equal(np.bincount(splits.train.labels), [3, 3, 3])
  np.testing.assert_array_equal(np.bincount(splits.test.labels), [2, 2, 2])
  assert len(splits.unknown) == 2 and set(splits.unknown.labels) == {-1}
  assert all("class_01" in p for p in splits.unknown.paths)
  paths = splits.train.paths + splits.val.paths + splits.test.paths
  assert len(set(paths)) == len(paths) == 18
  again = data.get_splits(data_config(root=str(root), split="train:3,val:1,test:2", seed=5,
                               holdout_classes=(1,)))
  assert again.test.paths == splits.test.paths


def test_canonical_split_needs_numbered_files(tmp_path):
  root = make_folder(tmp_path / "d", num_classes=2)
  splits = data.get_splits(data_config(root=str(root)))
  assert [pathlib.Path(p).stem for p in splits.train.paths] == ["1", "2", "3"] * 2
  assert [pathlib.Path(p).stem for p in splits.val.paths] == ["4", "4"]
  assert [pathlib.Path(p).stem for p in splits.test.paths] == ["5", "5"]
  Image.fromarray(rgb(0)).save(root / "class_00" / "extra.png")
  with pytest.raises(ValueError, match="extra.png"):
    data.get_splits(data_config(root=str(root)))


@pytest.mark.parametrize("field,value,match", [
    ("source", "imagenet", "config.data.source"),
    ("split", "train:2", "config.data.split"),
    ("seed", "zero", "config.data.seed"),
    ("holdout_classes", (0, 99), "config.data.holdout_classes"),
    ("holdout_classes", 3, "config.data.holdout_classes"),
    ("classes_subset", (0,), "config.data.classes_subset"),
    ("root", "", "config.data.root"),
])
def test_bad_config_names_the_field(tmp_path, field, value, match):
  root = make_folder(tmp_path / "d", num_classes=3)
  cfg = data_config(root=str(root)).to_dict()  # A plain dict: ConfigDict would type-check.
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    data.get_splits(cfg)


def test_unknown_source_lists_the_registered_names():
  with pytest.raises(ValueError, match="config.data.source") as e:
    data.get_splits({"source": "imagenet"})
  for name in ("image_folder", "birds525", "cars196", "digits", "tfds"):
    assert name in str(e.value)
  assert set(data.source_names()) >= {"image_folder", "birds525", "cars196", "digits",
                                       "tfds"}


def test_image_extensions_are_one_list(tmp_path):
  assert data.IMAGE_EXTENSIONS is transforms.IMAGE_EXTENSIONS
  assert {".jpg", ".png", ".jfif"} <= data.IMAGE_EXTENSIONS
  root = make_folder(tmp_path / "d", num_classes=2, per_class=1)
  Image.fromarray(rgb(0)).save(root / "class_00" / "2.JPG")  # Suffix case ignored.
  (root / "class_01" / "2.txt").write_text("not an image")
  scan = folder.scan_image_folder(root)
  assert [pathlib.Path(p).name for p in scan.paths] == ["1.png", "2.JPG", "1.png"]
  np.testing.assert_array_equal(scan.labels, [0, 0, 1])


def test_missing_root_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    data.get_splits(data_config(root=str(tmp_path / "nope")))


# ---- digits --------------------------------------------------------------------------
def test_digits_source():
  splits = data.get_splits(data_config(source="digits", split="canonical"))
  assert splits.class_names == [str(d) for d in range(10)]
  n = len(splits.train) + len(splits.val) + len(splits.test)
  assert n == 1797
  counts = np.bincount(datasets.load_digits().target)
  np.testing.assert_array_equal(
      np.bincount(splits.train.labels),
      [int(np.floor(0.6 * c + 1e-9)) + (0.6 * c % 1 >= 0.5) for c in counts])
  rec = splits.test[7]
  img = rec["image"]
  assert img.shape == (8, 8, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  ref = datasets.load_digits()
  matches = [i for i in range(len(ref.images))
             if np.array_equal(np.rint(ref.images[i] * 255 / 16), img[..., 0])]
  assert matches and all(ref.target[i] == rec["label"] for i in matches)
  assert splits.train.images.max() == 255


# ---- pipeline ------------------------------------------------------------------------
def _array_source(n: int = 10, h: int = 8, w: int = 8) -> data.ArraySource:
  images = np.stack([rgb(i, h, w) for i in range(n)])
  return data.ArraySource(images, np.arange(n) % 3)


KW = dict(seed=7, image_size=6, resize_size=8, mean=(10.0, 20.0, 30.0),
          std=(2.0, 4.0, 8.0), process_index=0, process_count=1)


def _take(it, k):
  return [b for _, b in zip(range(k), it)]


def test_eval_iterator_order_padding_and_values():
  src = _array_source(10)
  batches = list(data.make_iterator(src, batch_size=4, train=False, **KW))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                list(range(10)) + [9, 9])
  np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
  for b in batches:
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, 6, 6, 3)
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  ref = (src.images[5, 1:7, 1:7].astype(np.float64) - [10, 20, 30]) / [2, 4, 8]
  np.testing.assert_allclose(batches[1]["image"][1], ref, rtol=1e-6)
  np.testing.assert_array_equal(batches[1]["label"], np.arange(4, 8) % 3)


def test_train_iterator_epochs_shuffle_and_resume():
  src = _array_source(12)
  assert data.steps_per_epoch(src, 4) == 3 and data.steps_per_epoch(src, 5) == 2
  stream = _take(data.make_iterator(src, batch_size=4, train=True, **KW), 9)
  epochs = [np.concatenate([b["index"] for b in stream[e * 3:(e + 1) * 3]])
            for e in range(3)]
  for idx in epochs:
    np.testing.assert_array_equal(np.sort(idx), np.arange(12))  # One pass each.
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled.
  assert all(b["valid"].all() for b in stream)
  for b in stream:
    np.testing.assert_array_equal(b["label"], b["index"] % 3)
  resumed = _take(data.make_iterator(src, batch_size=4, train=True, start_step=4, **KW), 5)
  for x, y in zip(stream[4:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  finite = list(data.make_iterator(src, batch_size=5, train=True, num_epochs=2, **KW))
  assert len(finite) == 4
  other = _take(data.make_iterator(src, batch_size=4, train=True, **{**KW, "seed": 8}), 1)
  assert not np.array_equal(other[0]["image"], stream[0]["image"])


def test_train_images_are_augmented_crops():
  src = _array_source(8)
  b = next(data.make_iterator(src, batch_size=8, train=True, **{**KW, "mean": (0,),
                                                                 "std": (1,)}))
  for img, i in zip(b["image"], b["index"]):
    full = src.images[i].astype(np.float32)
    windows = [full[t:t + 6, l:l + 6] for t in range(3) for l in range(3)]
    assert any(np.array_equal(img, w) or np.array_equal(img, w[:, ::-1]) for w in windows)


def test_process_slices_partition_the_global_batch():
  src = _array_source(12)
  kw = {k: v for k, v in KW.items() if k not in ("process_index", "process_count")}
  whole = _take(data.make_iterator(src, batch_size=4, train=True, process_index=0,
                                   process_count=1, **kw), 2)
  parts = [_take(data.make_iterator(src, batch_size=4, train=True, process_index=p,
                                    process_count=2, **kw), 2) for p in range(2)]
  for s in range(2):
    for k in whole[s]:
      np.testing.assert_array_equal(whole[s][k],
                                    np.concatenate([parts[0][s][k], parts[1][s][k]]))
  with pytest.raises(ValueError, match="divisible by process_count"):
    data.make_iterator(src, batch_size=5, train=True, process_index=0, process_count=2,
                       **kw)


def test_worker_count_does_not_change_the_stream():
  src = _array_source(12)
  serial = _take(data.make_iterator(src, batch_size=4, train=True, worker_count=0, **KW), 5)
  parallel = _take(data.make_iterator(src, batch_size=4, train=True, worker_count=2, **KW), 5)
  for x, y in zip(serial, parallel):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 13}, "exceeds the 12 training examples"),
    ({"image_size": 9}, "image_size=9 must be <= resize_size=8"),
    ({"worker_count": -1}, "worker_count"),
    ({"start_step": -2}, "start_step"),
    ({"mean": (1, 2)}, "mean and std"),
    ({"std": (1, 0, 1)}, "std positive"),
])
def test_make_iterator_bad_arguments(kw, match):
  args = {**KW, "batch_size": 4, "train": True, **kw}
  with pytest.raises(ValueError, match=match):
    data.make_iterator(_array_source(12), **args)


# ---- birds525 (real data) ------------------------------------------------------------
def test_birds525_canonical(birds525_root):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Every image must decode: no "dropped" warning.
    splits = data.get_splits(data_config(source="birds525", root=str(birds525_root)))
  assert splits.num_classes == 525
  assert splits.class_names == sorted(splits.class_names)
  assert splits.class_names[0] == "ABBOTTS BABBLER"
  assert (len(splits.train), len(splits.val), len(splits.test)) == (1575, 525, 525)
  assert splits.train.bad_files == []
  np.testing.assert_array_equal(np.bincount(splits.train.labels), [3] * 525)
  np.testing.assert_array_equal(splits.test.labels, np.arange(525))
  assert {pathlib.Path(p).name for p in splits.val.paths} == {"4.jpg"}
  rec = splits.test[524]
  assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3
  assert pathlib.Path(splits.test.paths[524]).parent.name == splits.class_names[524]
  batch = next(data.make_iterator(splits.train, batch_size=4, train=True, seed=0,
                                  image_size=224, resize_size=256, mean=(127.5,),
                                  std=(127.5,), process_index=0, process_count=1))
  assert batch["image"].shape == (4, 224, 224, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_default_birds525_root_resolves(birds525_root):
  assert folder.shared_data_root("birds525").resolve() == \
      pathlib.Path(birds525_root).resolve()
  assert pipeline.steps_per_epoch(range(1575), 32) == 49


def test_digits_classes_subset_and_holdout():
  splits = data.get_splits(data_config(source="digits", split="train:0.5,test:0.5",
                                classes_subset=(1, 3, 5, 7), holdout_classes=(5,)))
  assert splits.class_names == ["1", "3", "7"] and splits.val is None
  assert splits.unknown_class_names == ["5"]
  assert set(splits.train.labels) == {0, 1, 2} and set(splits.unknown.labels) == {-1}
  counts = np.bincount(datasets.load_digits().target)
  assert len(splits.unknown) == counts[5] - round(counts[5] * 0.5)
  # Exactly the shared split + class selection: stratified positions, then classes
  # 1, 3, 7 re-indexed 0, 1, 2 and class 5's test images as the unknown split.
  images, labels = digits.digits_images()
  parts = splits_lib.stratified_split(labels, "fractions", {"train": 0.5, "test": 0.5}, 0)
  remap = {1: 0, 3: 1, 7: 2}
  for split, source in [("train", splits.train), ("test", splits.test)]:
    pos = [p for p in parts[split] if labels[p] in remap]
    np.testing.assert_array_equal(source.images, images[pos])
    np.testing.assert_array_equal(source.labels, [remap[labels[p]] for p in pos])
  pos = [p for p in parts["test"] if labels[p] == 5]
  np.testing.assert_array_equal(splits.unknown.images, images[pos])
  assert splits.unknown[0]["label"] == -1 and splits.unknown[0]["index"] == 0
