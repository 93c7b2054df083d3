"""Turn a DigitWorld recipe into one sample of the batch schema (no batch axis), deterministically.

The same (recipe, split_seed, epoch) always gives the same bytes; a new epoch gives new augmentations. Each
modality draws from its own random stream, so a variant that corrupts one modality leaves the others identical
to the clean rendering of the same sample.
"""

import functools
import threading
from typing import Any, Final, Mapping

import ml_collections
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, present_key
from crucible_jax.data import audio as audio_lib
from crucible_jax.data.digit_world import builder, draw, targets, templates
from crucible_jax.data.tokenizers import Tokenizer, tokenizer_of

VARIANTS: Final = ("clean", "corrupted", "imbalanced")
SNR_DB: Final = {"clean": (10.0, 30.0), "corrupted": (10.0, 30.0), "imbalanced": (-5.0, 5.0)}
SCRAMBLE_PATCH: Final = 4  # pixels per side of the tiles a scrambled image is cut into
STREAMS: Final = ("image", "video", "audio", "flags", "corrupt", "questions")  # one independent random stream each
_THREAD = threading.local()  # per-thread reusable stream generators (grain renders in several threads)


def stream_key(render_seed: int, split_seed: int, epoch: int) -> np.ndarray:
  """The 128-bit Philox key of a sample's streams: (render_seed, split_seed << 32 | epoch), no hashing.

  Values past 64/32/32 bits fall back to SeedSequence hashing (slower, still deterministic).
  """
  if min(render_seed, split_seed, epoch) < 0:
    raise ValueError(f"render_seed ({render_seed}), split_seed ({split_seed}) and epoch ({epoch}) "
                     "must be non-negative")
  if render_seed < 2**64 and split_seed < 2**32 and epoch < 2**32:
    return np.array([render_seed, (split_seed << 32) | epoch], np.uint64)
  return np.random.SeedSequence([render_seed, split_seed, epoch]).generate_state(2, np.uint64)


def sample_streams(render_seed: int, split_seed: int, epoch: int, count: int = len(STREAMS)) -> tuple:
  """The first `count` of a sample's STREAMS: Philox generators with one key, stream i at counter i << 192.

  Counter-based streams need no seed hashing: resetting a reused generator's state costs ~2 us against ~25 us
  for a new Generator. The generators are this thread's and are reset by its next call.
  """
  generators = getattr(_THREAD, "streams", None)
  if generators is None:
    generators = _THREAD.streams = tuple(np.random.Generator(np.random.Philox(0)) for _ in STREAMS)
  key = stream_key(render_seed, split_seed, epoch)
  for index, generator in enumerate(generators[:count]):
    generator.bit_generator.state = {
        "bit_generator": "Philox", "state": {"counter": np.array([0, 0, 0, index], np.uint64), "key": key},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
  return generators[:count]


def _digits(recipe: Mapping[str, Any], key: str) -> np.ndarray:
  digits = np.asarray(recipe[key], np.int32)
  return digits[digits >= 0]


@functools.lru_cache(maxsize=16384)
def _cached_tokens(text: str, tokenizer: Tokenizer) -> np.ndarray:
  """Read-only tokens of a caption or question: few distinct texts, so encode each once per process."""
  tokens = tokenizer.encode(text)
  tokens.flags.writeable = False
  return tokens


def _caption_tokens(digits: np.ndarray, template: int, data_cfg: Any) -> np.ndarray:
  return _cached_tokens(templates.caption(digits.tolist(), template), tokenizer_of(data_cfg)).copy()


def render_sample(
    recipe: Mapping[str, Any], data_cfg: ml_collections.ConfigDict, *, split_seed: int, epoch: int
) -> dict[str, np.ndarray]:
  """One sample dict in `schema.BATCH_SCHEMA` layout (no batch axis) from a builder record."""
  variant = data_cfg.variant
  if variant not in VARIANTS:
    raise ValueError(f"unknown DigitWorld variant {variant!r}; choose from {VARIANTS}")
  corrupting = variant == "corrupted"  # only that variant reads the flags and corrupt streams
  asking = bool(getattr(data_cfg, "extra_questions", 0))
  streams = sample_streams(int(recipe["render_seed"]), split_seed, epoch, len(STREAMS) if corrupting or asking else 3)
  rng_image, rng_video, rng_audio = streams[:3]
  rng_flags, rng_corrupt = streams[3:5] if corrupting else (None, None)

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
  snr_low, snr_high = getattr(data_cfg, "speech_snr_db", None) or SNR_DB[variant]
  audio, audio_len = draw.speak(digits, int(recipe["speaker"]), length, int(data_cfg.sample_rate),
                                rng_audio.uniform(snr_low, snr_high), rng_audio,
                                builder.voice_bank_of(data_cfg) if recipe["speaker"] >= len(draw.SPEAKERS) else None)
  text = _caption_tokens(digits, template, data_cfg)

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
      rms = float(np.sqrt(np.dot(audio[:audio_len], audio[:audio_len]) / audio_len))
      audio = np.zeros_like(audio)
      np.clip(np.float32(rms) * audio_lib.noise_slice(audio_len, rng_corrupt), -1.0, 1.0, out=audio[:audio_len])
    if corrupted[TEXT]:
      text = _caption_tokens(_digits(recipe, "distractor_digits"), template, data_cfg)

  question_type, param = int(recipe["question_type"]), int(recipe["question_param"])
  padded_digits = np.full((max_digits,), -1, np.int32)
  padded_digits[:num_digits] = digits
  extra = _extra_questions(digits, data_cfg, streams[STREAMS.index("questions")]) if asking else {}
  caption_len = int(getattr(data_cfg, "caption_len", 0))
  if caption_len:  # the converter's target: the true digits, whatever a corrupted caption says
    extra["caption"] = targets.caption_target(digits, caption_len)
  return {
      "image": np.asarray(image, np.float32),  # already float32: no copies
      "video": np.asarray(video, np.float32),
      "audio": np.asarray(audio, np.float32),
      "audio_len": np.int32(audio_len),
      "text": text,
      "question": _cached_tokens(templates.question(question_type, param),
                                 tokenizer_of(data_cfg, "question_len")).copy(),
      "answer": np.int32(templates.answer(digits.tolist(), question_type, param)),
      "question_type": np.int32(question_type),
      "digits": padded_digits,
      "num_digits": np.int32(num_digits),
      "string_id": np.int32(templates.string_id(digits.tolist())),
      "speaker": np.int32(recipe["speaker"]),
      "weight": np.float32(1.0),
      **{present_key(m): np.bool_(True) for m in MODALITIES},
      **{f"{m}_corrupted": np.bool_(corrupted[m]) for m in MODALITIES},
      **extra,
  }


def _extra_questions(digits: np.ndarray, data_cfg: ml_collections.ConfigDict, rng: np.random.Generator
                     ) -> dict[str, np.ndarray]:
  """`data.extra_questions` more random questions about the sample and their answers (more VQA signal per image)."""
  count, digit_list = int(data_cfg.extra_questions), digits.tolist()
  tokenizer = tokenizer_of(data_cfg, "question_len")
  drawn = [templates.draw_question(digit_list, rng) for _ in range(count)]
  return {
      "extra_questions": np.stack([_cached_tokens(templates.question(*q), tokenizer) for q in drawn]),
      "extra_answers": np.array([templates.answer(digit_list, *q) for q in drawn], np.int32),
  }


def padding_sample(data_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """An all-zero sample that says it is not data: weight 0, every `<m>_present` False, digits -1."""
  height, width = data_cfg.image_size
  frame_h, frame_w = data_cfg.video_size
  caption_len = int(getattr(data_cfg, "caption_len", 0))
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
      **({"extra_questions": np.zeros((int(data_cfg.extra_questions), int(data_cfg.question_len)), np.int32),
          "extra_answers": np.zeros((int(data_cfg.extra_questions),), np.int32)}
         if getattr(data_cfg, "extra_questions", 0) else {}),
      **({"caption": np.zeros((caption_len,), np.int32)} if caption_len else {}),
  }
