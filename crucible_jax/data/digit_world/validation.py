"""DigitWorld's data-config check: cheap, run at config load and again before any worker starts."""

import ml_collections

from crucible_jax.common_types import MODALITIES
from crucible_jax.data.digit_world import draw, render, targets


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the field when `data_cfg` cannot produce batches (checked before any worker starts)."""
  if data_cfg.variant not in render.VARIANTS:
    raise ValueError(f"data.variant={data_cfg.variant!r}; choose from {render.VARIANTS}")
  if not 0.0 <= data_cfg.corrupt_prob <= 1.0:
    raise ValueError(f"data.corrupt_prob={data_cfg.corrupt_prob} is not a probability")
  snr = data_cfg.get("speech_snr_db")
  if snr is not None and (len(snr) != 2 or not all(isinstance(x, (int, float)) for x in snr) or snr[0] > snr[1]):
    raise ValueError(f"data.speech_snr_db={snr!r} must be (low, high) decibels with low <= high, or None")
  extra = data_cfg.get("extra_questions", 0)
  if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
    raise ValueError(f"data.extra_questions={extra!r} must be a count >= 0")
  if extra and data_cfg.name != "digit_world":
    raise ValueError(f"data.extra_questions={extra}: only DigitWorld draws extra questions (data.name={data_cfg.name!r})")
  caption_len, needed = data_cfg.get("caption_len", 0), targets.caption_length(int(data_cfg.max_digits))
  if isinstance(caption_len, bool) or not isinstance(caption_len, int) or caption_len < 0 or 0 < caption_len < needed:
    raise ValueError(f"data.caption_len={caption_len!r} must be 0 (no caption targets) or >= {needed}, "
                     f"the tokens a {data_cfg.max_digits}-digit caption takes")
  unknown = set(data_cfg.drop_modalities) - set(MODALITIES)
  if unknown:
    raise ValueError(f"data.drop_modalities names unknown modalities {sorted(unknown)}; known: {MODALITIES}")
  needed = draw.worst_case_speech_seconds(int(data_cfg.sample_rate), int(data_cfg.max_digits))
  if needed > data_cfg.audio_seconds:
    raise ValueError(f"data.audio_seconds={data_cfg.audio_seconds} is shorter than the {needed:.2f} s that "
                     f"{data_cfg.max_digits} slow spoken digits can take")
