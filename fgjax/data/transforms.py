"""Image decoding and the paper's train / eval transforms (NumPy + PIL, host side).

Impostor Networks (Malkov et al.), Sec. 4 "Experimental details": images are resized
to 256 x 256; training adds a random crop and mirroring; evaluation uses the centre
crop. All functions here are pure: uint8 (H, W, 3) arrays in, arrays out, and every
random choice comes from an explicit `numpy.random.Generator`, so a batch is a
function of (seed, epoch, example index) only.

Decoding policy (why): `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` stays at PIL's default
(False) and is never changed here, because it is process-global state and because a
silently grey-padded truncated JPEG is a wrong training example. Truncated files are
therefore "bad files": image-folder sources detect them when they are built and drop
them with a report (see folder.py).

`IMAGE_EXTENSIONS` is the one list of file suffixes treated as images (image folders
and predict.py both use it).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Lower-case suffixes of the files treated as images wherever files are listed.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".jfif"})

# Modes that `Image.convert('RGB')` handles with the intended meaning.
_DIRECT_TO_RGB = ("RGB", "L", "CMYK", "YCbCr", "LAB", "HSV", "1")


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL image to RGB with explicit choices for the odd modes.

  * L / 1 (grayscale): the channel is replicated.
  * RGBA / LA / P with transparency: composited over a white background (a
    transparent pixel has no colour; white is what a viewer shows).
  * CMYK / YCbCr: PIL's conversion.
  * I / I;16 (16-bit grayscale; older Pillow decodes 16-bit PNGs as I): value *
    255 / 65535, clipped to 0..65535 (PIL's own conversion clips at 255 instead).
    A 12-bit image in a 16-bit container therefore stays dark, as it is.
  * F (float grayscale): taken as 0..1 (clipped), times 255.

  Args:
    img: a loaded PIL image of any mode.

  Returns:
    The image in mode 'RGB'.
  """
  mode = img.mode
  if mode == "RGB":
    return img
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    mode = img.mode
    if mode == "RGB":
      return img
  if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode in _DIRECT_TO_RGB:
    return img.convert("RGB")
  # High bit depth grayscale (I, I;16, F ...): scaled by the format's full range, so
  # brightness means the same in every image (a per-image min..max stretch would make
  # a dark 12-bit exposure look like a bright one).
  arr = np.asarray(img, dtype=np.float64)
  full = 1.0 if mode == "F" else 65535.0
  gray = np.round(np.clip(arr / full, 0.0, 1.0) * 255.0).astype(np.uint8)
  return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")


def decode_image(data: bytes | str | os.PathLike[str],
                 min_size: int | None = None) -> np.ndarray:
  """Decodes a file (path or bytes) into an RGB uint8 array.

  EXIF orientation is applied. When `min_size` is given, JPEG decoding may use
  libjpeg's DCT scaling (`Image.draft`) to decode at a reduced size that is still at
  least `min_size` on both sides: the later resize to `min_size` then costs less.

  Args:
    data: a file path or the encoded bytes.
    min_size: optional smallest side the caller will resize to.

  Returns:
    uint8 array (H, W, 3).

  Raises:
    OSError / PIL.UnidentifiedImageError / ValueError / SyntaxError: when the file
      cannot be decoded (garbage, truncated). Callers decide what to do.
  """
  fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  with Image.open(fp) as img:
    if min_size is not None and img.format == "JPEG":
      img.draft("RGB", (min_size, min_size))
    img.load()
    img = ImageOps.exif_transpose(img)
    return np.asarray(to_rgb(img), dtype=np.uint8)


def check_image_file(path: str | os.PathLike[str]) -> str | None:
  """Cheaply checks that a file decodes completely; returns an error text or None.

  Decodes the whole file, JPEGs at 1/8 scale (libjpeg still reads every entropy-coded
  byte, so truncation and corruption are found at a fraction of the cost).
  """
  try:
    with Image.open(path) as img:
      if img.format == "JPEG":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
      img.load()
      to_rgb(img)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


def crop_box(image: np.ndarray, box: Any) -> np.ndarray:
  """Crops an image to a normalised bounding box (ymin, xmin, ymax, xmax) in [0, 1].

  The TFDS BBox feature convention. The box is clipped to the image and always keeps
  at least one pixel per side.

  Args:
    image: (H, W, C) array.
    box: 4 floats (ymin, xmin, ymax, xmax), normalised.

  Returns:
    (h, w, C) view of `image`.
  """
  h, w = image.shape[:2]
  ymin, xmin, ymax, xmax = (float(v) for v in np.asarray(box, np.float64).reshape(4))
  top = min(max(int(np.floor(ymin * h)), 0), h - 1)
  left = min(max(int(np.floor(xmin * w)), 0), w - 1)
  bottom = max(min(int(np.ceil(ymax * h)), h), top + 1)
  right = max(min(int(np.ceil(xmax * w)), w), left + 1)
  return image[top:bottom, left:right]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (H, W, 3) uint8 to (size, size, 3) with PIL bilinear; no-op if equal.

  Square resize, aspect ratio not kept: the paper resizes to 256 x 256.
  """
  if image.shape[0] == size and image.shape[1] == size:
    return image
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Centre (size, size) crop of an (H, W, C) array with H, W >= size."""
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                     flip: bool = True) -> np.ndarray:
  """Uniform random (size, size) crop, then a horizontal flip with probability 1/2.

  Args:
    image: (H, W, C) with H, W >= size.
    size: crop side.
    rng: the generator; exactly three draws (top, left, flip) are always made, so
      the stream does not depend on `flip`.
    flip: whether mirroring is allowed (off for glyphs such as digits).

  Returns:
    (size, size, C) array.
  """
  h, w = image.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  mirror = bool(rng.integers(0, 2)) and flip
  out = image[top:top + size, left:left + size]
  return out[:, ::-1] if mirror else out


def train_transform(image: np.ndarray, *, image_size: int, resize_size: int,
                    rng: np.random.Generator, flip: bool = True) -> np.ndarray:
  """Paper training transform: resize to resize_size^2, random crop + mirror."""
  return random_crop_flip(resize(image, resize_size), image_size, rng, flip)


def eval_transform(image: np.ndarray, *, image_size: int, resize_size: int) -> np.ndarray:
  """Paper evaluation transform: resize to resize_size^2, centre crop."""
  return center_crop(resize(image, resize_size), image_size)


def eval_box(box: Any, *, image_size: int, resize_size: int) -> np.ndarray:
  """A normalised box (ymin, xmin, ymax, xmax) of the original image, in the
  coordinates of `eval_transform`'s output (square resize, then centre crop), clipped
  to [0, 1]. The square resize keeps normalised coordinates; the crop shifts and scales
  them by resize_size / image_size about the centre."""
  top = (resize_size - image_size) // 2
  b = np.asarray(box, np.float64).reshape(4) * resize_size - top
  return np.clip(b / image_size, 0.0, 1.0).astype(np.float32)


def normalize(images: np.ndarray, mean: Any, std: Any) -> np.ndarray:
  """(pixels - mean) / std in 0..255 pixel units, float32, per channel.

  Args:
    images: (..., 3) uint8 or float.
    mean, std: 3 floats each (the backbone's constants, 0..255 units).
  """
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  return (images.astype(np.float32) - mean) / std


def union_bbox(boxes: Any) -> np.ndarray:
  """Smallest normalised box (ymin, xmin, ymax, xmax) containing every box of (K, 4).

  K == 0 gives the whole image (0, 0, 1, 1).
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not len(boxes):
    return np.array([0.0, 0.0, 1.0, 1.0])
  return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])


def as_rgb_array(image: Any) -> np.ndarray:
  """A decoded image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3).

  Grayscale is replicated; an alpha channel is composited over white (as `to_rgb`).
  """
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f"image must be uint8, got {arr.dtype}.")
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image must be (H, W[, 1|3|4]), got shape {arr.shape}.")
  if arr.shape[-1] == 1:
    return np.repeat(arr, 3, axis=-1)
  if arr.shape[-1] == 4:
    return np.asarray(to_rgb(Image.fromarray(arr, "RGBA")), np.uint8)
  return arr
