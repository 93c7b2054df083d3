"""Optax chains: warmup+cosine AdamW, per-module-group learning rates, frozen (selective) updates."""

import re
from typing import Any, Mapping, Sequence

import flax.traverse_util
import jax
import ml_collections
import optax

FROZEN = "frozen"
DEFAULT_GROUP = "default"


def warmup_cosine(peak: float, warmup: int, steps: int, end_fraction: float = 0.05) -> optax.Schedule:
  """Linear warmup to `peak`, cosine decay to `end_fraction * peak` at `steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1), peak * end_fraction)


def param_labels(params: Any, frozen: Sequence[str], groups: Mapping[str, str]) -> Any:
  """Label each param by its '/'-joined path: FROZEN when a `frozen` regex matches, else its group.

  `groups` maps a group name to a path regex (first match wins); unmatched params are DEFAULT_GROUP.
  """
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    if any(re.search(pattern, path) for pattern in frozen):
      labels[path] = FROZEN
      continue
    labels[path] = next((name for name, pattern in groups.items() if re.search(pattern, path)), DEFAULT_GROUP)
  return flax.traverse_util.unflatten_dict(labels, sep="/")


def build_optimizer(stage: ml_collections.ConfigDict, optim: ml_collections.ConfigDict,
                    params: Any) -> optax.GradientTransformation:
  """AdamW per group (lr scaled by `optim.lr_scale[group]`, own warmup/steps), frozen groups set to zero."""
  groups = dict(optim.get("groups", {}))
  labels = param_labels(params, tuple(stage.frozen), groups)
  used = set(flax.traverse_util.flatten_dict(labels).values())
  transforms = {}
  for group in used:
    if group == FROZEN:
      transforms[group] = optax.set_to_zero()
      continue
    scale = float(optim.get("lr_scale", {}).get(group, 1.0))
    schedule = warmup_cosine(stage.lr * scale, stage.warmup, stage.steps)
    transforms[group] = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                                    mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), optax.multi_transform(transforms, labels))


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on biases, norms, scalars such as the temperature)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)
