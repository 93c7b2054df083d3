"""The batch schema every data source produces and every model/loss consumes.

A batch is a flat dict of numpy (host) or jax (device) arrays with a leading batch axis B.
DigitWorld and the real-benchmark loaders all emit this schema; a loader that lacks a modality
fills it with zeros and sets `<modality>_present = False`, so nothing downstream mistakes padding for data.
"""

from typing import Mapping

import numpy as np

from crucible_jax.common_types import MODALITIES, present_key

# key -> (dtype, shape after the batch axis, meaning). Symbolic dims are set by the data config.
BATCH_SCHEMA: dict[str, tuple[str, tuple[str, ...], str]] = {
    "image": ("float32", ("H", "W", "C"), "pixels in [0, 1]"),
    "video": ("float32", ("F", "H_v", "W_v", "C"), "frames, pixels in [0, 1]"),
    "audio": ("float32", ("T",), "mono waveform at the data's sample rate, zero-padded"),
    "audio_len": ("int32", (), "valid samples in `audio`"),
    "text": ("int32", ("L",), "caption tokens, 0 = padding"),
    "question": ("int32", ("L_q",), "VQA question tokens, 0 = padding"),
    "answer": ("int32", (), "VQA answer index in the closed answer vocabulary"),
    "question_type": ("int32", (), "VQA question family (for per-type accuracy)"),
    "digits": ("int32", ("D",), "the sample's digit string / transcript, -1 = padding"),
    "num_digits": ("int32", (), "length of the digit string"),
    "string_id": ("int32", (), "retrieval identity: equal ids = same content"),
    "speaker": ("int32", (), "audio speaker index"),
    "weight": ("float32", (), "per-sample loss weight (curriculum); 1.0 by default"),
    **{present_key(m): ("bool", (), f"sample carries a real {m}") for m in MODALITIES},
    **{f"{m}_corrupted": ("bool", (), f"{m} was deliberately corrupted (robustness variants)") for m in MODALITIES},
}

# Keys only some sources carry. A batch has one exactly when its data config sets the size named here (DigitWorld
# sets only extra_questions and caption_len: its tagging targets are the digits, its VQA has one answer per question).
OPTIONAL_SCHEMA: dict[str, tuple[str, tuple[str, ...], str]] = {
    "labels": ("float32", ("K",), "multi-hot class labels (AudioSet's 527), K = data.num_labels"),
    "answers": ("int32", ("A",), "VQA vocabulary indices of the A = data.num_human_answers human answers; "
                "-1 = padding, -2 = an answer outside the vocabulary"),
    "extra_questions": ("int32", ("Q", "L_q"), "Q = data.extra_questions more VQA questions about the sample "
                        "(training signal; evaluation reads `question`)"),
    "extra_answers": ("int32", ("Q",), "answer indices of `extra_questions`"),
    "caption": ("int32", ("L_c",), "the caption a generation head learns to write: byte tokens, EOS, 0 = padding"),
}
OPTIONAL_SIZES = {"labels": ("K", "num_labels"), "answers": ("A", "num_human_answers"),
                  "extra_questions": ("Q", "extra_questions"), "extra_answers": ("Q", "extra_questions"),
                  "caption": ("L_c", "caption_len")}


def batch_schema(data_cfg) -> dict[str, tuple[str, tuple[str, ...], str]]:
  """BATCH_SCHEMA plus the optional keys `data_cfg` asks for."""
  optional = {k: v for k, v in OPTIONAL_SCHEMA.items() if data_cfg.get(OPTIONAL_SIZES[k][1])}
  return {**BATCH_SCHEMA, **optional}


def check_batch(batch: Mapping[str, np.ndarray], required: tuple[str, ...] = ()) -> None:
  """Raise ValueError naming the culprit key if `batch` breaks the schema."""
  known = {**BATCH_SCHEMA, **OPTIONAL_SCHEMA}
  unknown = sorted(set(batch) - set(known))
  if unknown:
    raise ValueError(f"batch has keys outside the schema: {unknown}")
  missing = [k for k in required if k not in batch]
  if missing:
    raise ValueError(f"batch lacks required keys: {missing}")
  sizes = {k: np.shape(v)[0] for k, v in batch.items() if np.ndim(v) > 0}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"batch keys disagree on the batch size: {sizes}")
  for key, value in batch.items():
    dtype, dims, _ = known[key]
    if np.ndim(value) != len(dims) + 1:
      raise ValueError(f"batch[{key!r}] has rank {np.ndim(value)}, schema wants batch + {dims}")
    if np.dtype(value.dtype) != np.dtype(dtype):
      raise ValueError(f"batch[{key!r}] has dtype {value.dtype}, schema wants {dtype}")


def example_batch(data_cfg, batch_size: int) -> dict[str, np.ndarray]:
  """A zero batch with the schema's shapes for `data_cfg` (model init, shape checks, benchmarks)."""
  channels = int(data_cfg.get("channels", 1))
  dims = {
      "H": data_cfg.image_size[0], "W": data_cfg.image_size[1], "C": channels,
      "F": data_cfg.video_frames, "H_v": data_cfg.video_size[0], "W_v": data_cfg.video_size[1],
      "T": int(round(data_cfg.audio_seconds * data_cfg.sample_rate)), "L": data_cfg.text_len,
      "L_q": data_cfg.question_len, "D": data_cfg.max_digits,
      **{dim: int(data_cfg.get(field) or 0) for dim, field in OPTIONAL_SIZES.values()},
  }
  return {key: np.zeros((batch_size, *(dims[d] for d in shape)), dtype)
          for key, (dtype, shape, _) in batch_schema(data_cfg).items()}
