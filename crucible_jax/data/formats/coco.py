"""MSCOCO captions (2017 layout) for image-text retrieval and captioning.

Layout under `root`:
  annotations/captions_{split}.json   {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
  {split}/{file_name}                 the JPEG images
"""

import json
import os
from typing import Sequence

import numpy as np

from crucible_jax.data.formats import common


class CocoCaptions(common.RecordSource):
  """One sample per (image, caption) (`per="caption"`) or per image with one chosen caption (`per="image"`).

  `string_id` is the COCO image id, so captions of one image share a retrieval identity; `captions(i)` gives all
  captions of record i's image (for image-to-text recall over the 5 references).
  """

  def __init__(self, root: str, split: str = "val2017", *, per: str = "caption", caption_index: int = 0,
               image_size: int | Sequence[int] = 224, channels: int = 3, text_len: int = 64,
               skip_bad_records: bool = False, tokenizer: common.Tokenizer | None = None):
    super().__init__(skip_bad_records)
    self.tokenizer = tokenizer  # None: byte tokens
    common.check_choice("per", per, ("caption", "image"))
    common.check_positive(text_len=text_len)
    common.check_choice("channels", channels, (1, 3))
    self.per, self.caption_index, self.channels, self.text_len = per, caption_index, channels, text_len
    self.image_size = common.image_hw(image_size)
    common.require_dir(root, "COCO root")
    self.image_dir = common.require_dir(os.path.join(root, split), f"COCO {split} images")
    self.annotation_file = common.require_file(
        os.path.join(root, "annotations", f"captions_{split}.json"), "COCO captions")
    images, annotations = self._read_json()

    paths: dict[int, str] = {}
    listed: set[int] = set()  # ids in images[], including those skipped for a bad file
    for n, entry in enumerate(images):
      try:
        common.require_keys(entry, ("id", "file_name"), self.annotation_file, f"images[{n}]")
        image_id = common.int32_id(entry["id"], self.annotation_file, f"images[{n}]")
        listed.add(image_id)
        path = os.path.join(self.image_dir, entry["file_name"])
        if not os.path.isfile(path):
          raise common.BadRecord(path, f"image id {image_id}", "missing_file")
        paths[image_id] = path
      except common.BadRecord as err:
        self._reject(err)
    self._captions: dict[int, list[str]] = {image_id: [] for image_id in paths}
    for n, entry in enumerate(annotations):
      try:
        self._add_caption(n, entry, paths, listed)
      except common.BadRecord as err:
        self._reject(err)

    self._paths = paths
    for image_id in sorted(paths):
      captions = self._captions[image_id]
      if per == "caption":
        self.records.extend((image_id, k) for k in range(len(captions)))
      else:
        self._admit(lambda image_id=image_id: self._image_record(image_id))
    self._finish(self.annotation_file)

  def _read_json(self) -> tuple[list, list]:
    try:
      with open(self.annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{self.annotation_file}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
      raise ValueError(f"{self.annotation_file}: needs top-level 'images' and 'annotations' lists")
    return data["images"], data["annotations"]

  def _add_caption(self, n: int, entry: dict, paths: dict[int, str], listed: set[int]) -> None:
    record = f"annotations[{n}]"
    common.require_keys(entry, ("image_id", "caption"), self.annotation_file, record)
    image_id = common.int32_id(entry["image_id"], self.annotation_file, record)
    if image_id not in paths:
      reason = "caption_of_skipped_image" if image_id in listed else "unknown_image"
      raise common.BadRecord(self.annotation_file, record, reason, f"image_id {image_id}")
    caption = entry["caption"]
    if not isinstance(caption, str) or not caption.strip():
      raise common.BadRecord(self.annotation_file, record, "empty_caption")
    self._captions[image_id].append(caption.strip())

  def _image_record(self, image_id: int) -> tuple[int, int]:
    captions = self._captions[image_id]
    if not captions:
      raise common.BadRecord(self.annotation_file, f"image id {image_id}", "no_caption")
    return image_id, self.caption_index % len(captions)

  def captions(self, index: int) -> list[str]:
    """Every caption of record `index`'s image, in file order."""
    return list(self._captions[self.records[index][0]])

  def caption(self, index: int) -> str:
    """The caption record `index` carries."""
    image_id, k = self.records[index]
    return self._captions[image_id][k]

  def _load(self, index: int) -> common.Sample:
    image_id, _ = self.records[index]
    image = common.load_image(self._paths[image_id], f"image id {image_id}", self.image_size, self.channels)
    text, truncated = common.fit_text(self.caption(index), self.text_len, self.tokenizer)
    if truncated:
      self._note_truncated("text", index)
    return {"image": image, "text": text, "string_id": np.array(image_id, np.int32),
            **common.flags("image", "text")}
