"""Shared machinery of the real-benchmark loaders: decoding, bad-record policy, the random-access base.

The loaders read the official on-disk layouts from a local directory; nothing is downloaded. tfds's
`coco_captions` and `librispeech` builders are not used because both need TensorFlow to construct (and
VQA v2, AudioSet and MSR-VTT are not in the tfds catalog at all), while this project runs without TF.

Bad input policy: a missing directory raises FileNotFoundError naming it. A bad record (corrupt image or
audio, JSON/CSV record missing keys, unknown label, empty caption, missing file) raises `BadRecord` (a
ValueError naming the file and the record); with `skip_bad_records=True` it is skipped instead and counted in
`source.stats["skipped"][reason]`. Records that are cheap to check are filtered at construction; decode
failures are found at read time, where `source[i]` deterministically returns the next good record.
Stats live in each process: grain workers each keep their own copy.
"""

import collections
import inspect
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from jaxtyping import Float
from PIL import Image

from crucible_jax.common_types import MODALITIES, present_key
from crucible_jax.data.tokenizers import ByteTokenizer, Tokenizer

Sample = dict[str, np.ndarray]
_INT32_MAX = np.iinfo(np.int32).max


class BadRecord(ValueError):
  """A record that cannot be turned into a sample; names the file, the record and a short reason."""

  def __init__(self, file: str | os.PathLike, record: Any, reason: str, detail: str = ""):
    self.file, self.record, self.reason = os.fspath(file), record, reason
    super().__init__(f"{self.file}: record {record!r}: {reason}{': ' + detail if detail else ''}")


def require_dir(path: str | os.PathLike, what: str) -> str:
  """`path` as str, or FileNotFoundError naming it and what it should hold."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} directory not found: {os.fspath(path)}")
  return os.fspath(path)


def require_file(path: str | os.PathLike, what: str) -> str:
  """`path` as str, or FileNotFoundError naming it and what it should hold."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}")
  return os.fspath(path)


def require_keys(entry: Any, keys: Sequence[str], file: str, record: Any) -> None:
  """BadRecord('malformed') unless `entry` is a dict holding every key in `keys`."""
  if not isinstance(entry, dict):
    raise BadRecord(file, record, "malformed", f"expected an object, got {type(entry).__name__}")
  missing = [k for k in keys if k not in entry]
  if missing:
    raise BadRecord(file, record, "malformed", f"missing keys {missing}")


def int32_id(value: Any, file: str, record: Any) -> int:
  """`value` as a non-negative id that fits the schema's int32 `string_id`, else BadRecord."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _INT32_MAX:
    raise BadRecord(file, record, "malformed", f"id {value!r} is not an int in [0, 2**31)")
  return int(value)


def natural_key(name: str) -> list[Any]:
  """Sort key putting 'f2.jpg' before 'f10.jpg'."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """ValueError naming the argument unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_positive(**values: float) -> None:
  """ValueError naming the first argument that is not > 0."""
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{name}={value!r} must be > 0")


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  """(height, width) from an int or a pair; ValueError otherwise."""
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
    raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width)")
  return hw  # type: ignore[return-value]


def load_image(path: str, record: Any, size: tuple[int, int], channels: int) -> Float[np.ndarray, "H W C"]:
  """Decode `path` with PIL as grayscale (1) or RGB (3), resize to `size` (h, w), float32 in [0, 1]."""
  check_choice("channels", channels, (1, 3))
  try:
    with Image.open(path) as img:
      img = img.convert("L" if channels == 1 else "RGB")
      if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
      pixels = np.asarray(img, np.float32) / 255.0
  except FileNotFoundError as err:
    raise BadRecord(path, record, "missing_file") from err
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    raise BadRecord(path, record, "corrupt_image", str(err)) from err
  return pixels[..., None] if channels == 1 else pixels


def load_audio(
    path: str, record: Any, start_s: float | None = None, end_s: float | None = None
) -> tuple[Float[np.ndarray, "T"], int]:
  """Mono float32 wave and sample rate of a WAV/FLAC file (soundfile), optionally cut to [start_s, end_s)."""
  import soundfile  # pylint: disable=C0415  (lazy: the model stack need not load libsndfile)

  try:
    with soundfile.SoundFile(path) as f:
      sr = f.samplerate
      start = 0 if start_s is None else int(round(start_s * sr))
      stop = f.frames if end_s is None else min(f.frames, int(round(end_s * sr)))
      if start > 0:
        f.seek(min(start, f.frames))
      wave = f.read(max(stop - start, 0), dtype="float32", always_2d=True)
  except FileNotFoundError as err:
    raise BadRecord(path, record, "missing_file") from err
  except (RuntimeError, OSError, ValueError, EOFError) as err:
    raise BadRecord(path, record, "corrupt_audio", str(err)) from err
  if wave.shape[0] == 0:
    raise BadRecord(path, record, "empty_audio", f"no samples in [{start_s}, {end_s}) s")
  return wave.mean(axis=1), sr


def resample_linear(wave: Float[np.ndarray, "T"], sr_in: int, sr_out: int) -> Float[np.ndarray, "T2"]:
  """Linear-interpolation resampling; cheap and adequate for encoders fed log-mels."""
  if sr_in == sr_out:
    return wave.astype(np.float32)
  out_len = max(1, int(round(len(wave) * sr_out / sr_in)))
  positions = np.arange(out_len, dtype=np.float64) * (sr_in / sr_out)
  return np.interp(positions, np.arange(len(wave)), wave).astype(np.float32)


def fit_audio(wave: Float[np.ndarray, "T"], length: int) -> tuple[Float[np.ndarray, "length"], int, bool]:
  """Zero-pad or truncate to `length`; returns (audio, valid samples, whether it was truncated)."""
  out = np.zeros((length,), np.float32)
  valid = min(len(wave), length)
  out[:valid] = wave[:valid]
  return out, valid, len(wave) > length


def fit_text(text: str, max_len: int, tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, bool]:
  """Tokens of `text` (byte tokens unless `tokenizer`) cut to fit `max_len`; (tokens, truncated)."""
  return (tokenizer or ByteTokenizer(max_len)).fit(text, max_len)


def flags(*present: str) -> Sample:
  """`<modality>_present` for every modality: True for those named, False for the rest."""
  return {present_key(m): np.array(m in present) for m in MODALITIES}


def fill_absent(sample: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Sample:
  """Add zero arrays for absent modalities (shapes e.g. {"audio": (T,), "video": (F, H, W, C)}), per the schema."""
  out = dict(sample)
  for modality, shape in shapes.items():
    if modality not in out and not out.get(present_key(modality), False):
      out[modality] = np.zeros(shape, np.int32 if modality == "text" else np.float32)
      if modality == "audio":
        out["audio_len"] = np.array(0, np.int32)
  return out


class RecordSource:
  """Grain-compatible random-access source over parsed records with the bad-record policy built in."""

  def __init__(self, skip_bad_records: bool):
    self.skip_bad_records = skip_bad_records
    self.stats: dict[str, Any] = {"records": 0, "read": 0, "skipped": collections.Counter(), "truncated": {}}
    self.records: list[Any] = []
    self._bad_at_read: set[int] = set()
    self._truncated: dict[str, set[int]] = collections.defaultdict(set)

  def _reject(self, err: BadRecord) -> None:
    """Raise `err`, or count it as skipped when `skip_bad_records`."""
    if not self.skip_bad_records:
      raise err
    self.stats["skipped"][err.reason] += 1
    logging.warning("skipping bad record: %s", err)

  def _admit(self, parse: Callable[[], Any]) -> None:
    """Append `parse()` to the records unless it raises BadRecord (then `_reject`)."""
    try:
      self.records.append(parse())
    except BadRecord as err:
      self._reject(err)

  def _finish(self, what: str) -> None:
    """Freeze the record list; ValueError if nothing usable is left."""
    self.stats["records"] = len(self.records)
    if not self.records:
      raise ValueError(f"no usable records in {what} (skipped: {dict(self.stats['skipped'])})")

  def _note_truncated(self, kind: str, index: int) -> None:
    """Count record `index` as truncated in `kind` (once per record); warn the first time."""
    seen = self._truncated[kind]
    if not seen:
      logging.warning("%s: truncating %s of record %d (and counting further cases in .stats)",
                      type(self).__name__, kind, index)
    seen.add(index)
    self.stats["truncated"][kind] = len(seen)

  def _load(self, index: int) -> Sample:
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> Sample:
    """Sample of record `index`; when skipping, the next good record (wrapping) in its place."""
    return self._first_good(index, self._load)

  def _first_good(self, index: int, load: Callable[[int], Sample]) -> Sample:
    """`load(index)`, or when skipping bad records, `load` of the next good record (wrapping)."""
    n = len(self.records)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} records")
    index %= n
    for step in range(n):
      j = (index + step) % n
      if j in self._bad_at_read:
        continue
      try:
        sample = load(j)
      except BadRecord as err:
        self._reject(err)
        self._bad_at_read.add(j)
        continue
      self.stats["read"] += 1
      return sample
    raise ValueError(f"{type(self).__name__}: every one of its {n} records failed to decode")

  def __repr__(self) -> str:
    return f"{type(self).__name__}(records={len(self)}, skipped={dict(self.stats['skipped'])})"


def open_benchmark(name: str, cfg: Mapping[str, Any] | Any) -> RecordSource:
  """Build the loader `name` from a mapping/ConfigDict of its constructor arguments (`root` included)."""
  # Imported here because the loaders import this module.
  from crucible_jax.data.formats import audioset, coco, librispeech, video_text, vqa  # pylint: disable=C0415

  loaders = {"coco": coco.CocoCaptions, "vqa": vqa.VqaV2, "audioset": audioset.AudioSet,
             "librispeech": librispeech.LibriSpeech, "video_text": video_text.VideoText}
  if name not in loaders:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(loaders)}")
  kwargs = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  accepted = set(inspect.signature(loaders[name]).parameters)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f"config keys {unknown} are not arguments of {loaders[name].__name__}; "
                     f"accepted: {sorted(accepted)}")
  return loaders[name](**kwargs)
