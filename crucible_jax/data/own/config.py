"""The own-data config (`data.name = "own"`), its checks at config load, and which modalities the data has."""

import os

import ml_collections
from ml_collections import config_dict

from crucible_jax.common_types import AUDIO, IMAGE, TEXT, VIDEO
from crucible_jax.data.own import records
from crucible_jax.data.tokenizers import default_tokenizer_config

BAD_RECORD_POLICIES = ("raise", "skip")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def own_data_config() -> ml_collections.ConfigDict:
  """Data config of your own collection; set `manifest` or `shards` (then `crucible config` shows what was found)."""
  c = ml_collections.ConfigDict()
  c.name = "own"
  c.manifest = config_dict.placeholder(str)  # a .jsonl or .csv manifest; paths in it are relative to its folder
  c.shards = config_dict.placeholder(str)  # WebDataset shards, a glob such as 'DIR/*.tar' (instead of a manifest)
  c.eval_manifest = config_dict.placeholder(str)  # held-out manifest for `test`; None = hold out eval_fraction
  c.eval_shards = config_dict.placeholder(str)  # held-out shards for `test` (instead of eval_manifest)
  c.eval_fraction = 0.1  # share of the records held out for `test` (by a hash of each record's name), in (0, 1)
  c.on_bad_record = "raise"  # raise: stop naming the manifest line / shard and key | skip: count, log, go on
  c.image_size = (64, 64)  # image (height, width), pixels, after the crop
  c.channels = 3  # colour channels of images and video frames (1 = grayscale)
  c.image_mean = IMAGENET_MEAN  # per-channel mean subtracted from pixels in [0, 1] (one value or one per channel)
  c.image_std = IMAGENET_STD  # per-channel std pixels are divided by
  c.crop_scale = (0.35, 1.0)  # train: random-resized-crop area, a fraction of the image (eval: centre crop)
  c.crop_ratio = (0.75, 1.3333)  # train: random-resized-crop aspect ratio (width / height) range
  c.video_frames = 4  # frames per clip, evenly spaced over the frame folder
  c.video_size = (32, 32)  # frame (height, width), pixels
  c.sample_rate = 16000  # audio is resampled to this rate (polyphase, anti-aliased), Hz
  c.audio_seconds = 2.0  # audio length, seconds: train crops a random window of longer clips, eval the start
  c.text_len = 32  # caption length, tokens (longer captions are cut and counted)
  c.question_len = 1  # VQA question length (own data has no questions)
  c.max_digits = 1  # digit-string slots (DigitWorld's targets; always -1 here)
  c.tokenizer = default_tokenizer_config()  # captions: byte | sentencepiece | hf | clip_bpe
  c.num_workers = 0  # grain worker processes decoding samples (0 = in the main process)
  c.prefetch_buffer = 2  # batches prefetched per process / per worker
  return c


def validate_own_data(data_cfg: ml_collections.ConfigDict) -> None:
  """ValueError naming the field when the own-data config cannot produce batches (no record is read)."""
  if bool(data_cfg.manifest) == bool(data_cfg.shards):
    raise ValueError("own data: set exactly one of data.manifest (a .jsonl/.csv file) and data.shards (a tar glob)"
                     f"; got manifest={data_cfg.manifest!r}, shards={data_cfg.shards!r}")
  if data_cfg.eval_manifest and data_cfg.eval_shards:
    raise ValueError("own data: set at most one of data.eval_manifest and data.eval_shards")
  for field in ("manifest", "eval_manifest"):
    path = data_cfg[field]
    if path:
      if not os.path.isfile(path):
        raise ValueError(f"data.{field}={path!r}: file not found")
      if os.path.splitext(path)[1].lower() not in (".jsonl", ".csv"):
        raise ValueError(f"data.{field}={path!r}: expected a .jsonl or .csv manifest")
  for field in ("shards", "eval_shards"):
    if data_cfg[field]:
      records.shard_files(data_cfg[field], field)
  if not 0.0 < data_cfg.eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={data_cfg.eval_fraction} must be in (0, 1)")
  if data_cfg.on_bad_record not in BAD_RECORD_POLICIES:
    raise ValueError(f"data.on_bad_record={data_cfg.on_bad_record!r}; choose from {BAD_RECORD_POLICIES}")
  if data_cfg.channels not in (1, 3):
    raise ValueError(f"data.channels={data_cfg.channels} must be 1 or 3")
  for field in ("image_mean", "image_std"):
    values = tuple(data_cfg[field])
    if len(values) not in (1, data_cfg.channels) or (field == "image_std" and min(values) <= 0):
      raise ValueError(f"data.{field}={values} needs 1 or data.channels={data_cfg.channels} values"
                       f"{' > 0' if field == 'image_std' else ''}")
  low, high = data_cfg.crop_scale
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(f"data.crop_scale={tuple(data_cfg.crop_scale)} must satisfy 0 < low <= high <= 1")
  low, high = data_cfg.crop_ratio
  if not 0.0 < low <= high:
    raise ValueError(f"data.crop_ratio={tuple(data_cfg.crop_ratio)} must satisfy 0 < low <= high")


def detect_modalities(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The modalities some record of the collection carries, in (image, text, audio, video) order (reads no media)."""
  validate_own_data(data_cfg)
  found = records.modalities_of(data_cfg)
  return tuple(m for m in (IMAGE, TEXT, AUDIO, VIDEO) if m in found)
