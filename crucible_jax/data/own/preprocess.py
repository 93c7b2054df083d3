"""Per-modality preprocessing of own data: Pillow images (random resized crop / centre crop, mean/std), soundfile
audio (polyphase anti-aliased resampling, random crop / start, zero-pad), video from frames (one crop for all)."""

import io
import math

import numpy as np
from PIL import Image
from scipy import signal

from crucible_jax.data.formats.common import BadRecord
from crucible_jax.data.own.records import Member, Ref, read_member

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


def _open(ref: Ref):
  return io.BytesIO(read_member(ref)) if isinstance(ref, Member) else ref


def decode_image(ref: Ref, channels: int, file: str, where: str) -> Image.Image:
  """The image at `ref` in grayscale (1) or RGB (3); BadRecord naming the record when it cannot be decoded."""
  try:
    with Image.open(_open(ref)) as img:
      return img.convert("L" if channels == 1 else "RGB")
  except FileNotFoundError as error:
    raise BadRecord(file, where, "missing_file", str(ref)) from error
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise BadRecord(file, where, "corrupt_image", f"{ref}: {error}") from error


def centre_box(width: int, height: int, aspect: float) -> Box:
  """The largest centred box of `aspect` (width / height) inside a width x height image."""
  w, h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
  left, top = (width - w) / 2, (height - h) / 2
  return round(left), round(top), round(left + w), round(top + h)


def random_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> Box:
  """Inception-style random resized crop: area in `scale`, aspect (log-uniform) in `ratio`; centre box fallback."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return centre_box(width, height, min(max(width / height, ratio[0]), ratio[1]))


def crop_resize(img: Image.Image, box: Box, size: tuple[int, int], mean: np.ndarray, std: np.ndarray
                ) -> np.ndarray:
  """`box` of `img` resized (bicubic) to `size` (h, w), float32 [h, w, c] normalised by mean/std."""
  out = img.resize((size[1], size[0]), Image.Resampling.BICUBIC, box=box)
  pixels = np.asarray(out, np.float32) / 255.0
  pixels = pixels[..., None] if pixels.ndim == 2 else pixels
  return (pixels - mean) / std


def image_box(img: Image.Image, size: tuple[int, int], train: bool, scale: tuple[float, float],
              ratio: tuple[float, float], rng: np.random.Generator | None) -> Box:
  """Train: a random resized crop; eval: the centre crop of the target aspect."""
  if train:
    return random_box(img.width, img.height, scale, ratio, rng)
  return centre_box(img.width, img.height, size[1] / size[0])


def decode_audio(ref: Ref, file: str, where: str) -> tuple[np.ndarray, int]:
  """Mono float32 waveform and sample rate (WAV/FLAC/MP3, any sample format) via soundfile; BadRecord on failure."""
  import soundfile  # pylint: disable=g-import-not-at-top  (libsndfile loads only where audio is read)

  try:
    wave, rate = soundfile.read(_open(ref), dtype="float32", always_2d=True)
  except FileNotFoundError as error:
    raise BadRecord(file, where, "missing_file", str(ref)) from error
  except (RuntimeError, OSError, ValueError, EOFError, soundfile.LibsndfileError) as error:
    raise BadRecord(file, where, "corrupt_audio", f"{ref}: {error}") from error
  if wave.shape[0] == 0:
    raise BadRecord(file, where, "empty_audio", str(ref))
  return wave.mean(axis=1), int(rate)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """`wave` at `rate_out`: polyphase FIR resampling with its anti-aliasing low-pass (scipy's resample_poly)."""
  if rate_in == rate_out:
    return wave.astype(np.float32, copy=False)
  g = math.gcd(rate_in, rate_out)
  return signal.resample_poly(wave, rate_out // g, rate_in // g).astype(np.float32)


def fit_audio(wave: np.ndarray, length: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
  """`length` samples: a random window (train, `rng`) or the start (eval) of longer clips; zero-pad shorter ones."""
  start = int(rng.integers(0, len(wave) - length + 1)) if rng is not None and len(wave) > length else 0
  out = np.zeros((length,), np.float32)
  piece = wave[start:start + length]
  out[: len(piece)] = piece
  return out, len(piece)


def frame_indices(available: int, wanted: int) -> np.ndarray:
  """`wanted` frame indices evenly spread over `available` frames (repeating when there are fewer)."""
  return np.floor((np.arange(wanted) + 0.5) * available / wanted).astype(int)
