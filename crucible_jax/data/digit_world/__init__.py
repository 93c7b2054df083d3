"""DigitWorld: digit strings shown, spoken, written and animated — an offline four-modality benchmark.

`templates` (answers, question types) is plain Python; the builder (tfds) and renderer import on first use.
"""

import importlib
from typing import Any

from crucible_jax.data.digit_world.templates import ANSWERS, QUESTION_TYPES

_LAZY = {
    "SPLITS": "builder", "DigitWorld": "builder", "digit_world_source": "builder", "prepare_digit_world": "builder",
    "reference_glyphs_of": "draw",
    "SPEAKERS": "draw", "VARIANTS": "render", "padding_sample": "render", "render_sample": "render",
}

__all__ = ["ANSWERS", "QUESTION_TYPES", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
  """Import the tfds/grain-backed parts only when used (models need ANSWERS, not TensorFlow Datasets)."""
  if name in _LAZY:
    return getattr(importlib.import_module(f"crucible_jax.data.digit_world.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'crucible_jax.data.digit_world' has no attribute {name!r}")
