"""Own data as a grain random-access source, and its train/eval batches through the generic loader.

Splits: `train` = the collection minus the held-out share (`data.eval_fraction`, by a hash of each record's name),
`test` = that share, or the whole `data.eval_manifest` / `data.eval_shards` when given. Bad records follow
`data.on_bad_record`: "raise" stops at the first, naming the manifest line (or shard and key); "skip" drops it,
logs it and counts it (`record_stats`, which the trainer writes into results.json).
"""

import functools
import json
from typing import Callable, Iterator

import ml_collections
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, TEXT, VIDEO
from crucible_jax.data import benchmarks, loader
from crucible_jax.data.formats import common
from crucible_jax.data.own import preprocess, records
from crucible_jax.data.own.config import validate_own_data
from crucible_jax.data.tokenizers import tokenizer_of

SPLITS = ("train", "test")


class OwnSource(common.RecordSource):
  """Records of one split; `source[i]` is the eval view (centre crop, first caption, audio from the start),
  `train_sample(i, rng)` the augmented one (random resized crop, a random caption, a random audio window)."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str):
    if split not in SPLITS:
      raise ValueError(f"own data has splits {SPLITS}, not {split!r}")
    validate_own_data(data_cfg)
    super().__init__(skip_bad_records=data_cfg.on_bad_record == "skip")
    self.cfg = data_cfg.to_dict()
    self.tokenizer = tokenizer_of(data_cfg)
    separate = bool(data_cfg.eval_manifest or data_cfg.eval_shards)
    held_out = split == "test"
    for file, where, row in records.entries(data_cfg, held_out=held_out):
      if isinstance(row, common.BadRecord):
        self._reject(row)
      elif separate or row.held_out(data_cfg.eval_fraction) == held_out:
        self.records.append(row)
    self._finish(f"the {split} split of {data_cfg.manifest or data_cfg.shards}")

  def _load(self, index: int, rng: np.random.Generator | None = None) -> common.Sample:
    row: records.Row = self.records[index]
    c, train = self.cfg, rng is not None
    mean, std = np.asarray(c["image_mean"], np.float32), np.asarray(c["image_std"], np.float32)
    sample: common.Sample = {"string_id": np.array(index, np.int32)}
    if row.image:
      img = preprocess.decode_image(row.image, c["channels"], row.file, row.where)
      box = preprocess.image_box(img, tuple(c["image_size"]), train, c["crop_scale"], c["crop_ratio"], rng)
      sample[IMAGE] = preprocess.crop_resize(img, box, tuple(c["image_size"]), mean, std)
    if row.video:
      picked = [row.video[i] for i in preprocess.frame_indices(len(row.video), c["video_frames"])]
      frames = [preprocess.decode_image(f, c["channels"], row.file, row.where) for f in picked]
      box = preprocess.image_box(frames[0], tuple(c["video_size"]), train, c["crop_scale"], c["crop_ratio"], rng)
      sample[VIDEO] = np.stack([preprocess.crop_resize(f, box, tuple(c["video_size"]), mean, std) for f in frames])
    if row.audio:
      wave, rate = preprocess.decode_audio(row.audio, row.file, row.where)
      wave = preprocess.resample(wave, rate, c["sample_rate"])
      length = int(round(c["audio_seconds"] * c["sample_rate"]))
      sample[AUDIO], valid = preprocess.fit_audio(wave, length, rng)
      sample["audio_len"] = np.array(valid, np.int32)
    if row.texts:
      caption = row.texts[int(rng.integers(len(row.texts)))] if train else row.texts[0]
      sample[TEXT], truncated = self.tokenizer.fit(caption)
      if truncated:
        self._note_truncated("text", index)
    return {**sample, **common.flags(*(m for m in (IMAGE, AUDIO, VIDEO, TEXT) if m in sample))}

  def train_sample(self, index: int, rng: np.random.Generator) -> common.Sample:
    """The augmented sample of record `index` (or of the next good one, when skipping)."""
    return self._first_good(index, lambda j: self._load(j, rng))

  def caption(self, index: int) -> str:
    """The caption record `index` is evaluated with."""
    return self.records[index].texts[0]


@functools.lru_cache(maxsize=8)
def _open(config_json: str, split: str) -> OwnSource:
  return OwnSource(ml_collections.ConfigDict(json.loads(config_json)), split)


def open_split(data_cfg: ml_collections.ConfigDict, split: str) -> OwnSource:
  """The split's source, parsed once per process (its skip counts then cover every read of this process)."""
  return _open(data_cfg.to_json(), split)


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        sample_hook: Callable[[int, dict], dict] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless, exactly resumable iterator of this process's augmented train batches."""
  return loader.train_batches(open_split(data_cfg, "train"), data_cfg, complete=benchmarks.completer(data_cfg),
                              global_batch=global_batch, seed=seed, process_index=process_index,
                              process_count=process_count, sample_hook=sample_hook)


def make_eval_batches(data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int,
                      process_index: int | None = None, process_count: int | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
  """Every record of `split` once, in order, in global batches padded with weight-0 samples."""
  return loader.eval_batches(open_split(data_cfg, split), data_cfg, complete=benchmarks.completer(data_cfg),
                             padding=benchmarks.blank_sample(data_cfg), batch_size=batch_size,
                             process_index=process_index, process_count=process_count)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Records in `split`."""
  return len(open_split(data_cfg, split))


def record_stats(data_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """`data/<split>/skipped_records` and `.../truncated_captions` this process has seen so far."""
  out = {}
  for split in SPLITS:
    stats = open_split(data_cfg, split).stats
    out[f"data/{split}/skipped_records"] = float(sum(stats["skipped"].values()))
    out[f"data/{split}/truncated_captions"] = float(stats["truncated"].get("text", 0))
  return out
