"""Turn a DigitWorld recipe into one sample of the batch schema (no batch axis), deterministically.

The same (recipe, split_seed, epoch) always gives the same bytes; a new epoch gives new augmentations. Each
modality draws from its own random stream, so a variant that corrupts one modality leaves the others identical
to the clean rendering of the same sample.
"""

from typing import Any, Final, Mapping

import ml_collections
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, present_key
from crucible_jax.data import tokenizer
from crucible_jax.data.digit_world import draw, templates

VARIANTS: Final = ("clean", "corrupted", "imbalanced")
SNR_DB: Final = {"clean": (10.0, 30.0), "corrupted": (10.0, 30.0), "imbalanced": (-5.0, 5.0)}
SCRAMBLE_PATCH: Final = 4  # pixels per side of the tiles a scrambled image is cut into


def _digits(recipe: Mapping[str, Any], key: str) -> np.ndarray:
  digits = np.asarray(recipe[key], np.int32)
  return digits[digits >= 0]


def _caption_tokens(digits: np.ndarray, template: int, text_len: int) -> np.ndarray:
  return tokenizer.encode(templates.caption(digits.tolist(), template), text_len)


def render_sample(
    recipe: Mapping[str, Any], data_cfg: ml_collections.ConfigDict, *, split_seed: int, epoch: int
) -> dict[str, np.ndarray]:
  """One sample dict in `schema.BATCH_SCHEMA` layout (no batch axis) from a builder record."""
  variant = data_cfg.variant
  if variant not in VARIANTS:
    raise ValueError(f"unknown DigitWorld variant {variant!r}; choose from {VARIANTS}")
  if split_seed < 0 or epoch < 0:
    raise ValueError(f"split_seed ({split_seed}) and epoch ({epoch}) must be non-negative")
  streams = np.random.SeedSequence([int(recipe["render_seed"]), split_seed, epoch]).spawn(5)
  rng_image, rng_video, rng_audio, rng_flags, rng_corrupt = (np.random.default_rng(s) for s in streams)

  digits = _digits(recipe, "digits")
  if len(digits) != int(recipe["num_digits"]) or len(digits) == 0:
    raise ValueError(f"DigitWorld record {recipe.get('index')} has digits {recipe['digits']} "
                     f"but num_digits={recipe['num_digits']}")
  num_digits = len(digits)
  max_digits = int(data_cfg.max_digits)
  length = int(round(data_cfg.audio_seconds * data_cfg.sample_rate))
  template = int(recipe["template"])

  image = draw.draw_canvas(recipe["image_pixels"], num_digits, tuple(data_cfg.image_size), rng_image,
                           easy=variant == "imbalanced")
  video = draw.draw_video(recipe["image_pixels"], num_digits, max_digits, int(data_cfg.video_frames),
                          tuple(data_cfg.video_size), rng_video)
  snr_low, snr_high = SNR_DB[variant]
  audio, audio_len = draw.speak(digits, int(recipe["speaker"]), length, int(data_cfg.sample_rate),
                                rng_audio.uniform(snr_low, snr_high), rng_audio)
  text = _caption_tokens(digits, template, int(data_cfg.text_len))

  corrupted = dict.fromkeys(MODALITIES, False)
  if variant == "corrupted":
    flags = rng_flags.random(len(MODALITIES)) < float(data_cfg.corrupt_prob)
    if flags.all():  # keep at least one modality clean
      flags[rng_flags.integers(len(MODALITIES))] = False
    corrupted = dict(zip(MODALITIES, flags.tolist()))
    if corrupted[IMAGE]:
      image = np.zeros_like(image) if rng_corrupt.random() < 0.5 else draw.scramble_patches(
          image, SCRAMBLE_PATCH, rng_corrupt)
    if corrupted[VIDEO]:
      other = _digits(recipe, "distractor_digits")
      video = draw.draw_video(recipe["distractor_pixels"], len(other), max_digits, int(data_cfg.video_frames),
                              tuple(data_cfg.video_size), rng_corrupt)[rng_corrupt.permutation(video.shape[0])]
    if corrupted[AUDIO]:  # same length and loudness as the speech it replaces
      rms = float(np.sqrt(np.mean(audio[:audio_len] ** 2)))
      audio = np.zeros_like(audio)
      audio[:audio_len] = np.clip(rng_corrupt.normal(0.0, rms, audio_len), -1.0, 1.0)
    if corrupted[TEXT]:
      text = _caption_tokens(_digits(recipe, "distractor_digits"), template, int(data_cfg.text_len))

  question_type, param = int(recipe["question_type"]), int(recipe["question_param"])
  padded_digits = np.full((max_digits,), -1, np.int32)
  padded_digits[:num_digits] = digits
  return {
      "image": image.astype(np.float32),
      "video": video.astype(np.float32),
      "audio": audio.astype(np.float32),
      "audio_len": np.int32(audio_len),
      "text": text,
      "question": tokenizer.encode(templates.question(question_type, param), int(data_cfg.question_len)),
      "answer": np.int32(templates.answer(digits.tolist(), question_type, param)),
      "question_type": np.int32(question_type),
      "digits": padded_digits,
      "num_digits": np.int32(num_digits),
      "string_id": np.int32(templates.string_id(digits.tolist())),
      "speaker": np.int32(recipe["speaker"]),
      "weight": np.float32(1.0),
      **{present_key(m): np.bool_(True) for m in MODALITIES},
      **{f"{m}_corrupted": np.bool_(corrupted[m]) for m in MODALITIES},
  }


def padding_sample(data_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """An all-zero sample that says it is not data: weight 0, every `<m>_present` False, digits -1."""
  height, width = data_cfg.image_size
  frame_h, frame_w = data_cfg.video_size
  return {
      "image": np.zeros((height, width, 1), np.float32),
      "video": np.zeros((int(data_cfg.video_frames), frame_h, frame_w, 1), np.float32),
      "audio": np.zeros((int(round(data_cfg.audio_seconds * data_cfg.sample_rate)),), np.float32),
      "audio_len": np.int32(0),
      "text": np.zeros((int(data_cfg.text_len),), np.int32),
      "question": np.zeros((int(data_cfg.question_len),), np.int32),
      "answer": np.int32(0),
      "question_type": np.int32(0),
      "digits": np.full((int(data_cfg.max_digits),), -1, np.int32),
      "num_digits": np.int32(0),
      "string_id": np.int32(-1),
      "speaker": np.int32(-1),
      "weight": np.float32(0.0),
      **{present_key(m): np.bool_(False) for m in MODALITIES},
      **{f"{m}_corrupted": np.bool_(False) for m in MODALITIES},
  }
