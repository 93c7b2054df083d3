"""Which rows of a host-side eval batch count: not padding, and carrying a modality."""

from typing import Any, Mapping

import numpy as np

from crucible_jax.common_types import present_key


def real_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """bool[B]: rows that are not padding."""
  return np.asarray(batch["weight"]) > 0 if "weight" in batch else np.ones(len(batch["digits"]), bool)


def present_rows(outputs: Mapping[str, Any], batch: Mapping[str, np.ndarray], modality: str) -> np.ndarray:
  """bool[B]: the sample carries `modality` (data flag, and the model's flag when it reports one)."""
  present = np.asarray(batch.get(present_key(modality), np.ones(len(batch["digits"]), bool)), bool)
  encoded = outputs.get("present", {}).get(modality)
  return present if encoded is None else present & np.asarray(encoded, bool)
