"""Data: the batch schema, the source registry, the generic loader, DigitWorld and format loaders (all lazily)."""

import importlib
from typing import Any

_LAZY = {
    "default_data_config": "crucible_jax.data.digit_world.config",
    "make_train_iterator": "crucible_jax.data.registry",
    "make_eval_batches": "crucible_jax.data.registry",
    "num_examples": "crucible_jax.data.registry",
    "to_global_batch": "crucible_jax.data.loader",
    "prepare_digit_world": "crucible_jax.data.digit_world",
    "digit_world_source": "crucible_jax.data.digit_world",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  """Import the data stack only when used, so models and benchmarks run where grain/tfds are absent."""
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'crucible_jax.data' has no attribute {name!r}")
