"""DigitWorld's drawing primitives: handwritten glyphs onto canvases and video frames, spoken clips into speech."""

import functools
import pathlib

import numpy as np

from crucible_jax.data import audio as audio_lib

SPEAKERS = ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June")
ASSET_DIR = pathlib.Path(__file__).parent / "assets" / "spoken_digits"

GLYPH_SCALE = (1.0, 1.75)  # upscaling of the 8x8 handwritten images on the canvas
VIDEO_SCALE = (1.0, 1.5)  # upscaling in video frames (16x16), leaving room to move
SPEED = (0.9, 1.1)  # speaking-rate perturbation (np.interp resampling)
GAP_SECONDS = (0.05, 0.25)  # silence before each spoken digit
CLIP_GAIN = (0.8, 1.0)  # per-digit loudness variation
UTTERANCE_GAIN = (0.5, 1.0)  # whole-utterance loudness


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation weights along one axis (pixel centres aligned); cached, read-only."""
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  low = np.floor(pos).astype(np.int64)
  high = np.minimum(low + 1, n_in - 1)
  weights = np.zeros((n_out, n_in), np.float32)
  np.add.at(weights, (np.arange(n_out), low), 1.0 - (pos - low))
  np.add.at(weights, (np.arange(n_out), high), pos - low)
  weights.flags.writeable = False
  return weights


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a 2-D image."""
  return _resize_matrix(image.shape[0], height) @ image @ _resize_matrix(image.shape[1], width).T


def glyph(pixels: np.ndarray, rng: np.random.Generator, *, scale: tuple[float, float], easy: bool) -> np.ndarray:
  """One augmented handwritten digit in [0, 1]: upscaled, stroke width and intensity varied."""
  image = pixels.astype(np.float32) / 16.0
  if easy:
    size = 12
    return np.clip(resize(image, size, size), 0.0, 1.0)
  size = int(round(8 * rng.uniform(*scale)))
  image = np.clip(resize(image, size, size), 0.0, 1.0) ** rng.uniform(0.7, 1.4)  # gamma < 1 thickens strokes
  if rng.random() < 0.25:  # 3x3 dilation: bolder pen
    padded = np.pad(image, 1)
    image = np.max([padded[dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)], axis=0)
  return image * rng.uniform(0.75, 1.0)


def draw_canvas(
    pixels: np.ndarray, num_digits: int, image_size: tuple[int, int], rng: np.random.Generator, *, easy: bool
) -> np.ndarray:
  """(H, W, 1) canvas: digit k in slot k of H x H, the used slots centred, each glyph jittered in its slot."""
  height, width = image_size
  slots = width // height
  if num_digits > slots:
    raise ValueError(f"image_size {image_size} has {slots} slots of {height}x{height}, "
                     f"too few for {num_digits} digits")
  canvas = np.zeros((height, width), np.float32)
  first = (width - num_digits * height) // 2
  for k in range(num_digits):
    mark = glyph(pixels[k], rng, scale=GLYPH_SCALE, easy=easy)
    size = mark.shape[0]
    if size > height:
      raise ValueError(f"image height {height} is smaller than a {size}-pixel glyph")
    top, left = ((height - size) // 2,) * 2 if easy else rng.integers(0, height - size + 1, size=2)
    left += first + k * height
    canvas[top : top + size, left : left + size] = np.maximum(canvas[top : top + size, left : left + size], mark)
  if not easy:
    canvas += 0.02 * rng.standard_normal(canvas.shape, dtype=np.float32)
  return np.clip(canvas, 0.0, 1.0)[..., None]


def draw_video(
    pixels: np.ndarray, num_digits: int, max_digits: int, frames: int, frame_size: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
  """(F, H, W, 1) clip: digit k is visible in frames [k*F/D, (k+1)*F/D), drifting a pixel per frame."""
  per_digit = frames // max_digits
  if per_digit < 1:
    raise ValueError(f"video_frames={frames} cannot show {max_digits} digits one after another")
  height, width = frame_size
  video = np.zeros((frames, height, width), np.float32)
  for k in range(num_digits):
    mark = glyph(pixels[k], rng, scale=VIDEO_SCALE, easy=False)
    size = mark.shape[0]
    if size > min(height, width):
      raise ValueError(f"video_size {frame_size} is smaller than a {size}-pixel glyph")
    position = rng.integers(0, [height - size + 1, width - size + 1])
    velocity = rng.integers(-1, 2, size=2)
    for f in range(k * per_digit, (k + 1) * per_digit):
      top, left = np.clip(position, 0, [height - size, width - size])
      video[f, top : top + size, left : left + size] = mark
      position = position + velocity
  return video[..., None]


def scramble_patches(image: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
  """Shuffle the (patch x patch) tiles of an (H, W, C) image: same pixels, no digit shapes."""
  height, width, channels = image.shape
  rows, cols = height // patch, width // patch
  tiles = image[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch, channels).swapaxes(1, 2)
  tiles = tiles.reshape(rows * cols, patch, patch, channels)[rng.permutation(rows * cols)]
  out = image.copy()
  out[: rows * patch, : cols * patch] = tiles.reshape(rows, cols, patch, patch, channels).swapaxes(1, 2).reshape(
      rows * patch, cols * patch, channels)
  return out


@functools.lru_cache(maxsize=4)
def speaker_clips(sample_rate: int) -> tuple[tuple[np.ndarray, ...], ...]:
  """clips[speaker][digit]: the bundled recordings, silence-trimmed, at `sample_rate` (loaded once per process)."""
  clips = []
  for speaker in SPEAKERS:
    per_digit = []
    for digit in range(10):
      waveform, rate = audio_lib.load_wav(ASSET_DIR / speaker / f"{digit}.wav")
      waveform = audio_lib.trim_silence(waveform, rate)
      if rate != sample_rate:
        waveform = audio_lib.resample_linear(waveform, rate / sample_rate)
      per_digit.append(waveform)
    clips.append(tuple(per_digit))
  return tuple(clips)


def worst_case_speech_seconds(sample_rate: int, num_digits: int) -> float:
  """Longest possible speech without gaps: the longest clip, `num_digits` times, at the slowest speed."""
  longest = max(len(clip) for clips in speaker_clips(sample_rate) for clip in clips)
  return num_digits * longest / SPEED[0] / sample_rate


def speak(
    digits: np.ndarray, speaker: int, length: int, sample_rate: int, snr_db: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
  """(waveform zero-padded to `length`, valid samples): the speaker's clips with gaps, speed, gain and noise.

  Gaps shrink (all by one factor) when a long, slow utterance would overrun `length`; speech is never cut.
  """
  clips = speaker_clips(sample_rate)[speaker]
  speed = rng.uniform(*SPEED)
  pieces = [audio_lib.resample_linear(clips[d], speed) * rng.uniform(*CLIP_GAIN) for d in digits]
  speech = sum(len(p) for p in pieces)
  if speech > length:
    raise ValueError(f"{len(digits)} spoken digits need {speech / sample_rate:.2f} s, "
                     f"more than audio_seconds={length / sample_rate:.2f}")
  gaps = rng.uniform(*GAP_SECONDS, size=len(pieces)) * sample_rate
  gaps *= min(1.0, (length - speech) / gaps.sum())
  gaps = np.floor(gaps).astype(np.int64)
  valid = speech + int(gaps.sum())
  utterance = np.zeros((valid,), np.float32)
  cursor = 0
  for gap, piece in zip(gaps, pieces):
    cursor += gap
    utterance[cursor : cursor + len(piece)] = piece
    cursor += len(piece)
  noise = rng.standard_normal(valid, dtype=np.float32)  # float32 draws: half the cost of float64 normals
  noisy = audio_lib.mix_at_snr(utterance * rng.uniform(*UTTERANCE_GAIN), noise, snr_db)
  out = np.zeros((length,), np.float32)
  out[:valid] = np.clip(noisy, -1.0, 1.0)
  return out, valid
