"""Image files → the pixels a converted tower was trained on (open_clip's eval transform, SigLIP's squash)."""

import pathlib
from typing import Any

import numpy as np
from PIL import Image

RESIZES = ("shortest", "squash")  # pretrained.preprocess.resize: shortest side + centre crop (CLIP) | to size (SigLIP)


def _shortest_side(image: Image.Image, size: int) -> Image.Image:
  """torchvision's Resize(size) on a PIL image: the shorter side becomes `size`, the longer keeps the ratio."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  return image.resize((new_w, new_h), Image.BICUBIC)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision's CenterCrop (its rounding included)."""
  w, h = image.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def load_image(path: str | pathlib.Path, spec: Any) -> np.ndarray:
  """float32[size, size, 3]: resized (bicubic), cropped, RGB, scaled to [0, 1], normalised by mean/std."""
  try:
    image = Image.open(path)
    image.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  if image.mode not in ("RGB", "RGBA", "L"):
    image = image.convert("RGB")
  size = int(spec["size"])
  if spec["resize"] == "shortest":
    image = _centre_crop(_shortest_side(image, size), size)
  elif spec["resize"] == "squash":
    image = image.resize((size, size), Image.BICUBIC)
  else:
    raise ValueError(f"pretrained.preprocess.resize={spec['resize']!r}: expected one of {RESIZES}")
  pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
  return (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
