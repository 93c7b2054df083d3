"""Karpathy's COCO / Flickr30k caption splits (`dataset_coco.json`, `dataset_flickr30k.json`).

The file is `{"dataset": NAME, "images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}]}`;
an image lives at `IMAGES/filepath/filename` (COCO: `val2014/COCO_val2014_....jpg`) or `IMAGES/filename`
(Flickr30k, which has no filepath). The usual protocol keeps each image's first 5 captions (a few COCO images
have 6 or 7): 5,000 images and 25,000 captions in COCO's test split, 1,000 and 5,000 in Flickr30k's.
"""

import dataclasses
import json
import pathlib

import numpy as np

CAPTIONS_PER_IMAGE = 5


@dataclasses.dataclass(frozen=True)
class KarpathySplit:
  """One split: image files, captions, and for each caption the index of its image."""

  dataset: str
  images: tuple[str, ...]
  captions: tuple[str, ...]
  caption_image: np.ndarray  # [len(captions)] int: index into images


def _entry_field(entry: object, field: str, where: str, kind: type) -> object:
  if not isinstance(entry, dict) or not isinstance(entry.get(field), kind):
    raise ValueError(f"{where} has no {field!r} {kind.__name__} field")
  return entry[field]


def read_karpathy(path: str | pathlib.Path, images_dir: str | pathlib.Path, split: str = "test",
                  captions_per_image: int | None = CAPTIONS_PER_IMAGE) -> KarpathySplit:
  """The images of `split` under `images_dir` with their first `captions_per_image` captions (None: all).

  ValueError names the file and the entry for malformed JSON, a missing field, too few captions or an empty
  split; FileNotFoundError names the first missing image files.
  """
  path, images_dir = pathlib.Path(path), pathlib.Path(images_dir)
  if not path.is_file():
    raise FileNotFoundError(f"Karpathy split file not found: {path}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a JSON file: {e}") from e
  entries = _entry_field(data, "images", str(path), list)
  images, captions, caption_image, splits = [], [], [], set()
  for i, entry in enumerate(entries):
    where = f"{path}: images[{i}]"
    splits.add(_entry_field(entry, "split", where, str))
    if entry["split"] != split:
      continue
    filename = _entry_field(entry, "filename", where, str)
    sentences = _entry_field(entry, "sentences", where, list)
    raw = [_entry_field(s, "raw", f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
    if captions_per_image is not None:
      if len(raw) < captions_per_image:
        raise ValueError(f"{where} ({filename}) has {len(raw)} captions; the protocol needs {captions_per_image}")
      raw = raw[:captions_per_image]
    captions.extend(raw)
    caption_image.extend([len(images)] * len(raw))
    images.append(str(images_dir / entry.get("filepath", "") / filename))
  if not images:
    raise ValueError(f"{path} has no image in split {split!r}; its splits are {sorted(splits)}")
  missing = [p for p in images if not pathlib.Path(p).is_file()]
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) of {path} split {split!r} not found under {images_dir}, "
                            f"e.g. {missing[0]}")
  return KarpathySplit(str(data.get("dataset", path.stem)), tuple(images), tuple(captions),
                       np.asarray(caption_image, np.int64))
