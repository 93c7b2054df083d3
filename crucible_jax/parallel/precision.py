"""Mixed precision: a dtype policy written into the model config, and dynamic loss scaling for float16.

bfloat16 has float32's exponent range and needs no loss scaling; float16 does: the loss is multiplied by a large
scale before differentiation so small gradients survive, grads are divided by it afterwards, and a step whose
grads overflowed is skipped while the scale halves (`DynamicLossScale`, `all_finite`, `select_tree`).
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
PARAM_DTYPES = ("bfloat16", "float32")
FAMILIES = ("image", "video", "audio", "text", "fusion")  # model sub-configs that carry their own `dtype`


def _dtype(value: Any, key: str, allowed: tuple[str, ...]) -> jnp.dtype:
  name = jnp.dtype(value).name if not isinstance(value, str) else value
  if name not in allowed:
    raise ValueError(f"precision.{key}={value!r}; choose one of {allowed}")
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Dtypes of params (storage), compute (activations/matmuls), outputs (logits, loss) and per model family."""

  param_dtype: jnp.dtype = jnp.dtype("float32")
  compute_dtype: jnp.dtype = jnp.dtype("float32")
  output_dtype: jnp.dtype = jnp.dtype("float32")
  per_family: Mapping[str, jnp.dtype] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, precision: Mapping[str, Any] | None) -> "Policy":
    """Policy from `dict(compute=..., params=..., output=..., families=dict(image=..., ...))`; absent = float32."""
    precision = dict(precision or {})
    unknown = sorted(set(precision) - {"compute", "params", "output", "families"})
    if unknown:
      raise ValueError(f"unknown precision keys {unknown}; expected compute, params, output, families")
    families = dict(precision.get("families") or {})
    bad = sorted(set(families) - set(FAMILIES))
    if bad:
      raise ValueError(f"unknown precision.families {bad}; model families are {FAMILIES}")
    return cls(
        param_dtype=_dtype(precision.get("params", "float32"), "params", PARAM_DTYPES),
        compute_dtype=_dtype(precision.get("compute", "float32"), "compute", COMPUTE_DTYPES),
        output_dtype=_dtype(precision.get("output", "float32"), "output", COMPUTE_DTYPES),
        per_family={k: _dtype(v, f"families.{k}", COMPUTE_DTYPES) for k, v in families.items()},
    )

  @property
  def needs_loss_scaling(self) -> bool:
    """float16 anywhere in compute underflows small gradients without a loss scale."""
    dtypes = [self.compute_dtype, *self.per_family.values()]
    return any(d == jnp.float16 for d in dtypes)

  def family_dtype(self, family: str) -> jnp.dtype:
    """Compute dtype of one model family (its override, else the global compute dtype)."""
    return self.per_family.get(family, self.compute_dtype)

  def apply_to_model_config(self, model_cfg: Any) -> Any:
    """Write `dtype`, `param_dtype` and each family's `<family>.dtype` (as dtype names) into a model ConfigDict."""
    missing = sorted(f for f in self.per_family if f not in model_cfg)
    if missing:
      raise ValueError(f"precision.families names {missing}, which the model config does not have")
    with model_cfg.unlocked():
      model_cfg.dtype = self.compute_dtype.name
      model_cfg.param_dtype = self.param_dtype.name
      for family in FAMILIES:
        if family in model_cfg and model_cfg[family] is not None:
          model_cfg[family].dtype = self.family_dtype(family).name
    return model_cfg


def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: every element of every leaf is finite (no inf/nan)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `on_true if pred else on_false` inside jit (e.g. keep the old params on an overflowed step)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@struct.dataclass
class DynamicLossScale:
  """Loss scale that halves on overflow and doubles after `period` finite steps in a row (a jit-able pytree)."""

  scale: jax.Array
  good_steps: jax.Array
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_scale: float = struct.field(pytree_node=False, default=1.0)

  @classmethod
  def create(cls, initial_scale: float = 2.0**15, period: int = 2000, factor: float = 2.0) -> "DynamicLossScale":
    """A fresh scale; 2**15 keeps typical f16 losses well below overflow."""
    if initial_scale < 1 or period < 1 or factor <= 1:
      raise ValueError(f"loss scale needs initial_scale >= 1, period >= 1, factor > 1; got "
                       f"{initial_scale}, {period}, {factor}")
    return cls(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32), period, factor)

  def scale_loss(self, loss: jax.Array) -> jax.Array:
    """Loss times the scale (differentiate this one)."""
    return loss * self.scale.astype(loss.dtype)

  def unscale(self, grads: Any) -> Any:
    """Grads divided by the scale, computed in float32 and cast back to each leaf's dtype."""
    inv = 1.0 / self.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

  def update(self, grads_finite: jax.Array) -> "DynamicLossScale":
    """Next scale: halve (not below min) and reset the count on overflow, else count and grow every `period`."""
    grow = grads_finite & (self.good_steps + 1 >= self.period)
    scale = jnp.where(
        grads_finite,
        jnp.where(grow, self.scale * self.factor, self.scale),
        jnp.maximum(self.scale / self.factor, self.min_scale),
    )
    good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
    return self.replace(scale=scale, good_steps=good_steps.astype(jnp.int32))
