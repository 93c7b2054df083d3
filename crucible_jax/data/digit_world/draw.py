"""DigitWorld's drawing primitives: handwritten glyphs onto canvases and video frames, spoken clips into speech."""

import functools
import math
import pathlib

import ml_collections
import numpy as np
import scipy.signal

from crucible_jax.data import audio as audio_lib
from crucible_jax.data.digit_world import voices

SPEAKERS = ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June")
ASSET_DIR = pathlib.Path(__file__).parent / "assets" / "spoken_digits"

IMAGE_FRACTIONS = (0.70, 0.15)  # train, val; test gets the rest of each class's handwritten images
GLYPH_SCALE = (1.0, 1.75)  # upscaling of the 8x8 handwritten images on the canvas
VIDEO_SCALE = (1.0, 1.5)  # upscaling in video frames (16x16), leaving room to move
SPEED = (0.9, 1.1)  # speaking-rate perturbation (np.interp resampling)
SPEED_STEPS = 21  # speaking rates are quantised to this many values over SPEED (0.01 apart), so clips are cached
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


def _clip_unit(array: np.ndarray) -> np.ndarray:
  """Clip to [0, 1] in place with two ufuncs (np.clip's Python wrapper costs more than the work here)."""
  return np.minimum(np.maximum(array, 0.0, out=array), 1.0, out=array)


def _dilate3(image: np.ndarray) -> np.ndarray:
  """3x3 max filter (zero border) as two separable passes of shifted maxima: a bolder pen."""
  out = image.copy()
  np.maximum(out[1:], image[:-1], out=out[1:])
  np.maximum(out[:-1], image[1:], out=out[:-1])
  rows = out.copy()
  np.maximum(out[:, 1:], rows[:, :-1], out=out[:, 1:])
  np.maximum(out[:, :-1], rows[:, 1:], out=out[:, :-1])
  return out


def glyph(image: np.ndarray, draws: np.ndarray | None, *, scale: tuple[float, float], easy: bool) -> np.ndarray:
  """One augmented handwritten digit in [0, 1] from an 8x8 `image` in [0, 1]: upscaled, stroke width and ink varied.

  `draws` are 4 uniforms in [0, 1) (size, gamma, bold pen, ink), drawn by the caller in one call per sample;
  `easy` ignores them (fixed 12x12, no augmentation).
  """
  if easy:
    return np.clip(resize(image, 12, 12), 0.0, 1.0)
  u_size, u_gamma, u_bold, u_ink = draws.tolist()
  size = int(round(8 * (scale[0] + (scale[1] - scale[0]) * u_size)))
  mark = resize(image, size, size)
  _clip_unit(mark)
  np.power(mark, np.float32(0.7 + 0.7 * u_gamma), out=mark)  # gamma < 1 thickens strokes
  if u_bold < 0.25:
    mark = _dilate3(mark)
  mark *= np.float32(0.75 + 0.25 * u_ink)
  return mark


def _unit_images(pixels: np.ndarray) -> np.ndarray:
  """uint8 handwritten images (values 0..16) as float32 in [0, 1]."""
  return np.asarray(pixels, np.float32) * np.float32(1.0 / 16.0)


def draw_canvas(
    pixels: np.ndarray, num_digits: int, image_size: tuple[int, int], rng: np.random.Generator, *, easy: bool
) -> np.ndarray:
  """(H, W, 1) canvas: digit k in the k-th H x H box from the left (a form's digit boxes), jittered in its box.

  Fixed boxes make reading position k a local task, as on a form; with the used boxes centred, where digit k sits
  would depend on the string's length.
  """
  height, width = image_size
  slots = width // height
  if num_digits > slots:
    raise ValueError(f"image_size {image_size} has {slots} slots of {height}x{height}, "
                     f"too few for {num_digits} digits")
  canvas = np.zeros((height, width), np.float32)
  images = _unit_images(pixels[:num_digits])
  draws = None if easy else rng.random((num_digits, 6))  # per digit: 4 for the glyph, 2 for its position
  for k in range(num_digits):
    mark = glyph(images[k], None if easy else draws[k, :4], scale=GLYPH_SCALE, easy=easy)
    size = mark.shape[0]
    if size > height:
      raise ValueError(f"image height {height} is smaller than a {size}-pixel glyph")
    if easy:
      top = left = (height - size) // 2
    else:
      top, left = (int(u * (height - size + 1)) for u in draws[k, 4:].tolist())
    left += k * height
    region = canvas[top : top + size, left : left + size]
    np.maximum(region, mark, out=region)
  if not easy:
    canvas += np.float32(0.02) * audio_lib.noise_slice(height * width, rng).reshape(height, width)
  _clip_unit(canvas)
  return canvas[..., None]


def reference_glyphs(pixels: np.ndarray, labels: np.ndarray, box: int) -> np.ndarray:
  """(10, box, box) glyphs, one per digit: the image nearest its class mean, drawn un-augmented in a box's centre.

  The reference hand for generated images: a text or speech prompt says which digits to draw, never the writer's
  stroke, size or jitter, so a decoder trained against the sample's own image can only learn their blurred mean.
  """
  images = _unit_images(pixels)
  glyphs = np.zeros((10, box, box), np.float32)
  for digit in range(10):
    members = images[labels == digit]
    if not len(members):
      raise ValueError(f"no handwritten image of digit {digit} to draw its reference glyph from")
    nearest = members[np.argmin(np.sum(np.square(members - members.mean(axis=0)), axis=(1, 2)))]
    mark = glyph(nearest, None, scale=GLYPH_SCALE, easy=True)
    if mark.shape[0] > box:
      raise ValueError(f"image height {box} is smaller than a {mark.shape[0]}-pixel reference glyph")
    offset = (box - mark.shape[0]) // 2
    glyphs[digit, offset : offset + mark.shape[0], offset : offset + mark.shape[1]] = mark
  return glyphs


def handwritten_image_splits(seed: int) -> dict[str, np.ndarray]:
  """Disjoint indices into sklearn's 1,797 handwritten digits per split pool, ~70/15/15 within each class."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  targets = load_digits().target
  rng = np.random.default_rng([seed, 7919])
  pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
  for digit in range(10):
    members = rng.permutation(np.nonzero(targets == digit)[0])
    n_train = int(round(IMAGE_FRACTIONS[0] * len(members)))
    n_val = int(round(IMAGE_FRACTIONS[1] * len(members)))
    pools["train"].append(members[:n_train])
    pools["val"].append(members[n_train : n_train + n_val])
    pools["test"].append(members[n_train + n_val :])
  return {name: np.sort(np.concatenate(parts)) for name, parts in pools.items()}


def reference_glyphs_of(data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(10, H, H) `reference_glyphs` from the train pool of handwritten images, H = the image height."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  train = handwritten_image_splits(int(data_cfg.seed))["train"]
  return reference_glyphs(digits.images[train].astype(np.uint8), digits.target[train],
                          int(data_cfg.image_size[0]))


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
  images = _unit_images(pixels[:num_digits])
  draws = rng.random((num_digits, 8))  # per digit: 4 for the glyph, 2 for its start, 2 for its velocity
  for k in range(num_digits):
    mark = glyph(images[k], draws[k, :4], scale=VIDEO_SCALE, easy=False)
    size = mark.shape[0]
    if size > min(height, width):
      raise ValueError(f"video_size {frame_size} is smaller than a {size}-pixel glyph")
    u_top, u_left, u_dy, u_dx = draws[k, 4:].tolist()
    top0, left0 = int(u_top * (height - size + 1)), int(u_left * (width - size + 1))
    dy, dx = int(u_dy * 3) - 1, int(u_dx * 3) - 1  # -1, 0 or +1 pixel per frame
    for step in range(per_digit):  # at most frames/max_digits slice copies: cheaper than fancy indexing
      top = min(max(top0 + dy * step, 0), height - size)
      left = min(max(left0 + dx * step, 0), width - size)
      video[k * per_digit + step, top : top + size, left : left + size] = mark
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


@functools.lru_cache(maxsize=4)
def voice_clips(sample_rate: int, bank: str | None, count: int) -> tuple[tuple[np.ndarray, ...], ...]:
  """clips[speaker][digit]: the real speakers, then the `count` synthetic voices of `bank` (None: real only).

  Synthetic clips are silence-trimmed, band-limited to `sample_rate` and never longer than the longest real clip
  (a longer one is sped up to fit), so `worst_case_speech_seconds` holds for every voice.
  """
  real = speaker_clips(sample_rate)
  if bank is None:
    return real
  longest = max(len(clip) for clips in real for clip in clips)
  synthetic, rate = voices.load_bank(bank, count)
  divisor = math.gcd(sample_rate, rate)
  fitted = []
  for per_digit in synthetic:
    row = []
    for clip in per_digit:
      clip = audio_lib.trim_silence(clip, rate)
      clip = scipy.signal.resample_poly(clip, sample_rate // divisor, rate // divisor).astype(np.float32)
      if len(clip) > longest:
        clip = audio_lib.resample_linear(clip, len(clip) / longest)[:longest]
      row.append(clip)
    fitted.append(tuple(row))
  return real + tuple(fitted)


@functools.lru_cache(maxsize=None)  # bounded: speakers x 10 digits x SPEED_STEPS per sample rate and bank
def spoken_clip(sample_rate: int, speaker: int, digit: int, speed_step: int, bank: str | None = None,
                count: int = 0) -> tuple[np.ndarray, float]:
  """(read-only clip, its energy sum(x^2)): `digit` by `speaker` at speed `speeds()[speed_step]`, cached per process."""
  clip = audio_lib.resample_linear(voice_clips(sample_rate, bank, count)[speaker][digit], float(speeds()[speed_step]))
  clip.flags.writeable = False
  return clip, float(np.sum(clip.astype(np.float64) ** 2))


def speeds() -> np.ndarray:
  """The SPEED_STEPS speaking rates a spoken digit can have, evenly spaced over SPEED (both ends included)."""
  return np.linspace(SPEED[0], SPEED[1], SPEED_STEPS)


def worst_case_speech_seconds(sample_rate: int, num_digits: int) -> float:
  """Longest possible speech without gaps: the longest clip, `num_digits` times, at the slowest speed."""
  longest = max(len(clip) for clips in speaker_clips(sample_rate) for clip in clips)
  return num_digits * longest / SPEED[0] / sample_rate


def speak(
    digits: np.ndarray, speaker: int, length: int, sample_rate: int, snr_db: float, rng: np.random.Generator,
    bank: tuple[str, int] | None = None,
) -> tuple[np.ndarray, int]:
  """(waveform zero-padded to `length`, valid samples): the speaker's clips with gaps, speed, gain and noise.

  Gaps shrink (all by one factor) when a long, slow utterance would overrun `length`; speech is never cut. The
  speed is one of `speeds()` (cached resampled clips); the noise is a slice of the process's noise bank. Speakers
  past `SPEAKERS` are the synthetic voices of `bank` (its path and voice count).
  """
  count = len(digits)
  draws = rng.random(2 + 2 * count)  # speed, utterance gain, then per digit: clip gain, gap before it
  speed_step = min(int(draws[0] * SPEED_STEPS), SPEED_STEPS - 1)
  if speaker >= len(SPEAKERS) and bank is None:
    raise ValueError(f"speaker {speaker} is a synthetic voice (past the {len(SPEAKERS)} real ones) "
                     "but no bank was given")
  bank_args = bank if speaker >= len(SPEAKERS) else (None, 0)
  pieces = [spoken_clip(sample_rate, speaker, int(d), speed_step, *bank_args) for d in digits]
  speech = sum(len(clip) for clip, _ in pieces)
  if speech > length:
    raise ValueError(f"{count} spoken digits need {speech / sample_rate:.2f} s, "
                     f"more than audio_seconds={length / sample_rate:.2f}")
  utterance_gain = UTTERANCE_GAIN[0] + (UTTERANCE_GAIN[1] - UTTERANCE_GAIN[0]) * draws[1]
  gains = (CLIP_GAIN[0] + (CLIP_GAIN[1] - CLIP_GAIN[0]) * draws[2 : 2 + count]) * utterance_gain
  gaps = (GAP_SECONDS[0] + (GAP_SECONDS[1] - GAP_SECONDS[0]) * draws[2 + count :]) * sample_rate
  gaps *= min(1.0, (length - speech) / gaps.sum())
  gaps = np.floor(gaps).astype(np.int64).tolist()
  valid = speech + sum(gaps)
  out = np.zeros((length,), np.float32)
  cursor, energy = 0, 0.0
  for gap, (clip, clip_energy), gain in zip(gaps, pieces, gains.tolist()):
    cursor += gap
    np.multiply(clip, np.float32(gain), out=out[cursor : cursor + len(clip)])
    cursor += len(clip)
    energy += gain * gain * clip_energy
  noise = audio_lib.noise_slice(valid, rng)
  scale = audio_lib.snr_scale(energy / valid, float(np.dot(noise, noise)) / valid, snr_db)
  head = out[:valid]
  head += np.float32(scale) * noise
  np.clip(head, -1.0, 1.0, out=head)
  return out, valid
