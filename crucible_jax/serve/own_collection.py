"""Your own collection (a JSONL/CSV manifest or WebDataset shards) as index batches, preprocessed for the model.

Every record is read (the whole collection is the `test` split of an own-data config) with the model's eval
preprocessing: its image size, channels, mean/std, audio rate and length, text length and tokenizer. Each caption
of a record is its own text item. Items keep the original file as their payload (video: an animated GIF of the
frames) and point at it: `path` is the file (or `SHARD.tar#KEY`; for a caption, `MANIFEST:line N`).
"""

import os
import pathlib
from typing import Any, Iterator

import ml_collections
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO
from crucible_jax.data.own import preprocess, records
from crucible_jax.data.own.config import own_data_config
from crucible_jax.data.own.source import OwnSource
from crucible_jax.serve import media
from crucible_jax.serve.export import input_keys

KINDS = ("manifest", "shards")  # SOURCE prefixes: manifest:FILE.jsonl|.csv, shards:'DIR/*.tar'
MODEL_KEYS = ("image_size", "image_mean", "image_std", "video_frames", "video_size", "sample_rate", "audio_seconds",
              "text_len")  # preprocessing the model was trained with; copied from its data config when it has them
GIF_SIDE = 128  # longest side of a video item's GIF frames, pixels

Batch = dict[str, tuple[dict[str, np.ndarray], list[dict[str, Any]]]]


def own_config(kind: str, location: str, model_data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An own-data config whose `test` split is all of `location`, preprocessed as `model_data` (the model's)."""
  c = own_data_config()
  for key in MODEL_KEYS:
    if model_data.get(key) is not None:
      c[key] = model_data[key]
  if model_data.get("image_mean") is None:  # DigitWorld models read pixels in [0, 1]
    c.image_mean, c.image_std = (0.0,), (1.0,)
  c.channels = int(model_data.get("channels") or 1)
  if model_data.get("tokenizer") is not None:
    c.tokenizer = ml_collections.ConfigDict(model_data.tokenizer.to_dict())
  c[kind] = c[f"eval_{kind}"] = location
  return c


def _bytes(ref: records.Ref) -> bytes:
  return records.read_member(ref) if isinstance(ref, records.Member) else pathlib.Path(ref).read_bytes()


def _path(ref: records.Ref, row: records.Row) -> str:
  if isinstance(ref, records.Member):
    return f"{os.path.abspath(ref.shard)}#{row.where.removeprefix('key ')}"
  return os.path.abspath(ref)


def _video_gif(row: records.Row) -> bytes:
  frames = [preprocess.decode_image(f, 3, row.file, row.where) for f in row.video]
  scale = GIF_SIDE / max(frames[0].size)
  size = (max(1, round(frames[0].width * scale)), max(1, round(frames[0].height * scale)))
  return media.gif(np.stack([np.asarray(f.resize(size), np.float32) / 255.0 for f in frames]))


def _items(source: OwnSource, index: int, spec: str) -> Iterator[tuple[str, dict[str, np.ndarray], dict[str, Any]]]:
  """(modality, encoder inputs of one item, its record) for every item of record `index`."""
  row: records.Row = source.records[index]
  sample = source[index]  # BadRecord (naming the manifest line or shard key) when a file does not decode
  base = {"source": spec, "source_row": index}
  for modality in (IMAGE, AUDIO):
    ref = getattr(row, modality)
    if ref:
      data = _bytes(ref)
      yield modality, {k: sample[k] for k in input_keys(modality)}, {
          **base, "path": _path(ref, row), "payload": data, "mime": media.mime_of(data)}
  if row.video:
    yield VIDEO, {VIDEO: sample[VIDEO]}, {**base, "path": _path(row.video[0], row), "payload": _video_gif(row),
                                          "mime": media.MIME[VIDEO]}
  for caption in row.texts:
    tokens, _ = source.tokenizer.fit(caption)
    yield TEXT, {TEXT: tokens}, {**base, "text": caption, "path": f"{os.path.abspath(row.file)}:{row.where}",
                                 "mime": media.MIME[TEXT]}


def open_own(kind: str, location: str, model_data: ml_collections.ConfigDict, batch_size: int, spec: str
             ) -> tuple[int, Iterator[tuple[int, Batch]]]:
  """(records, iterator of (records in the batch, {modality: (inputs, item records)})) of an own collection."""
  try:
    source = OwnSource(own_config(kind, location, model_data), "test")
  except ValueError as e:
    raise ValueError(f"data source {spec!r}: {e}") from e

  def batches() -> Iterator[tuple[int, Batch]]:
    for start in range(0, len(source), batch_size):
      stop = min(start + batch_size, len(source))
      items: dict[str, tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]] = {}
      for i in range(start, stop):
        for modality, inputs, record in _items(source, i, spec):
          items.setdefault(modality, ([], []))[0].append(inputs)
          items[modality][1].append(record)
      yield stop - start, {m: ({k: np.stack([x[k] for x in items[m][0]]) for k in items[m][0][0]}, items[m][1])
                           for m in MODALITIES if m in items}

  return len(source), batches()
