"""Optax chains: warmup+cosine AdamW, per-module-group learning rates and schedules, frozen and skipped updates.

Selective updates come in two kinds. Frozen by schedule (`stages.X.frozen` regexes): the group's update is zero
and the step cuts its gradient with stop_gradient (`step.stop_frozen`), so the backward work is never done.
Skipped by gradient norm (`optim.skip_below[group]`): the gradient is computed, and when the group's norm (after
global clipping) is below the threshold, neither its params nor its optimizer moments change that step.
"""

import re
from typing import Any, Mapping, NamedTuple, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

FROZEN = "frozen"
DEFAULT_GROUP = "default"
DECAYS = ("cosine", "linear", "constant")
SCHEDULE_FIELDS = ("warmup", "decay", "end_fraction", "delay")


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


def group_schedule(peak: float, stage_warmup: int, stage_steps: int, spec: Mapping[str, Any],
                   group: str = DEFAULT_GROUP) -> optax.Schedule:
  """A group's LR schedule over the stage's steps: zero for `delay` steps, warmup, then cosine/linear/constant decay.

  `spec` fields (all optional): warmup (steps, default the stage's), decay ("cosine"), end_fraction (of peak at the
  stage's end, default 0.05), delay (steps before the group starts learning, default 0).
  """
  unknown = sorted(set(spec) - set(SCHEDULE_FIELDS))
  if unknown:
    raise ValueError(f"optim.schedules.{group} has unknown fields {unknown}; known: {SCHEDULE_FIELDS}")
  warmup, delay = int(spec.get("warmup", stage_warmup)), int(spec.get("delay", 0))
  decay, end_fraction = str(spec.get("decay", "cosine")), float(spec.get("end_fraction", 0.05))
  if decay not in DECAYS:
    raise ValueError(f"optim.schedules.{group}.decay={decay!r}; choose from {DECAYS}")
  if warmup < 0 or delay < 0 or not 0.0 <= end_fraction <= 1.0:
    raise ValueError(f"optim.schedules.{group}: warmup and delay must be >= 0 steps and end_fraction in [0, 1], "
                     f"got warmup={warmup}, delay={delay}, end_fraction={end_fraction}")
  steps = max(stage_steps - delay, 1)
  if decay == "cosine":
    base = warmup_cosine(peak, warmup, steps, end_fraction)
  else:
    rest = max(steps - warmup, 1)  # linear/constant with warmup 0 start at `peak` on the first step
    tail = (optax.linear_schedule(peak, peak * end_fraction, rest) if decay == "linear"
            else optax.constant_schedule(peak))
    base = tail if warmup == 0 else optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), tail], [warmup])
  if delay == 0:
    return base
  return optax.join_schedules([optax.constant_schedule(0.0), base], [delay])


class SkipState(NamedTuple):
  """Inner optimizer state plus how many updates the gradient-norm criterion skipped."""

  inner: optax.OptState
  skipped: jax.Array  # int32 count of skipped updates


def skip_small_updates(inner: optax.GradientTransformation, threshold: float) -> optax.GradientTransformation:
  """`inner`, except that a step whose gradient norm is below `threshold` changes neither params nor inner state."""

  def init(params: Any) -> SkipState:
    return SkipState(inner.init(params), jnp.zeros((), jnp.int32))

  def update(grads: Any, state: SkipState, params: Any = None) -> tuple[Any, SkipState]:
    skip = optax.tree.norm(grads) < threshold
    updates, new_inner = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)
    new_inner = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_inner, state.inner)
    return updates, SkipState(new_inner, state.skipped + skip.astype(jnp.int32))

  return optax.GradientTransformation(init, update)


def _check_group_names(optim: ml_collections.ConfigDict, groups: Mapping[str, str]) -> None:
  """ValueError naming an lr_scale/schedules/skip_below entry whose group is not defined in optim.groups."""
  known = set(groups) | {DEFAULT_GROUP}
  for field in ("lr_scale", "schedules", "skip_below"):
    unknown = sorted(set(optim.get(field, {})) - known)
    if unknown:
      raise ValueError(f"optim.{field} names groups {unknown} that optim.groups does not define "
                       f"(known: {sorted(known)})")


def build_optimizer(stage: ml_collections.ConfigDict, optim: ml_collections.ConfigDict, params: Any,
                    frozen: Sequence[str] | None = None) -> optax.GradientTransformation:
  """AdamW per group (lr scaled by `optim.lr_scale[group]`, schedule by `optim.schedules[group]`), frozen = zero;
  `frozen` (default: the stage's `frozen`) are the regexes of the params held fixed."""
  groups = dict(optim.get("groups", {}))
  _check_group_names(optim, groups)
  labels = param_labels(params, tuple(stage.frozen if frozen is None else frozen), groups)
  used = set(flax.traverse_util.flatten_dict(labels).values())
  transforms = {}
  for group in used:
    if group == FROZEN:
      transforms[group] = optax.set_to_zero()
      continue
    scale = float(optim.get("lr_scale", {}).get(group, 1.0))
    if scale < 0:
      raise ValueError(f"optim.lr_scale.{group}={scale} must be >= 0")
    peak_lr = stage.lr * scale
    if not np.isfinite(np.float32(peak_lr)):  # an inf LR times a zero Adam update is NaN: params lost
      raise ValueError(f"the stage's lr={stage.lr:g} x optim.lr_scale.{group}={scale:g} overflows float32")
    spec = dict(optim.get("schedules", {}).get(group, {}))
    schedule = group_schedule(peak_lr, int(stage.warmup), int(stage.steps), spec, group)
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=_decay_mask)
    threshold = float(optim.get("skip_below", {}).get(group, 0.0))
    transforms[group] = skip_small_updates(tx, threshold) if threshold > 0 else tx
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), optax.multi_transform(transforms, labels))


def skipped_updates(opt_state: Any) -> int:
  """Total updates skipped by the gradient-norm criterion, summed over groups (0 when it is off)."""
  found = [int(s.skipped) for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SkipState))
           if isinstance(s, SkipState)]
  return sum(found)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on biases, norms, scalars such as the temperature)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)
