"""Modality priorities of a query's parts: configured per modality, or a routed model's importance scores.

With a `router` artifact (a routed model's export) and no configured priorities, each query's parts are scored by
the router's importance estimator, as the model scores a sample's modalities in training: the part it rates lower is
queued behind higher-rated work and is the one shed when the deadline cannot be met. Otherwise the configured
per-modality integers are used.
"""

from typing import Mapping

import numpy as np

from crucible_jax.common_types import present_key
from crucible_jax.serve.artifact import ExportDir

DEFAULT_PRIORITIES = {"text": 3, "image": 2, "audio": 1, "video": 0}  # cheapest encoders first
ROUTER, CONFIGURED = "router", "configured"  # where a service's priorities come from


class Priorities:
  """`of(parts)` -> {modality: priority} for one query's (modality, encoder inputs) parts; higher runs first."""

  def __init__(self, export: ExportDir, configured: Mapping[str, int] | None = None):
    routed = configured is None and "router" in export.manifest["artifacts"]
    self.router = export.artifact("router") if routed else None
    self.scored = tuple(export.manifest.get("router_modalities") or ())
    self.source = ROUTER if routed else CONFIGURED
    self.configured = {m: float(p) for m, p in (configured or DEFAULT_PRIORITIES).items()}

  def of(self, parts: list[tuple[str, Mapping[str, np.ndarray]]]) -> dict[str, float]:
    """Each part's priority: its router score (the other modalities marked absent), or the configured value."""
    if self.router is None:
      return {m: self.configured.get(m, 0.0) for m, _ in parts}
    inputs = {k: np.zeros((1, *spec["shape"][1:]), spec["dtype"]) for k, spec in self.router.inputs.items()}
    for modality, part in parts:
      if modality in self.scored:
        inputs.update(part)
        inputs[present_key(modality)] = np.ones((1,), bool)
    scores = self.router(inputs)["scores"][0]
    return {m: float(scores[self.scored.index(m)]) if m in self.scored else self.configured.get(m, 0.0)
            for m, _ in parts}
