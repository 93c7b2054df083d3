"""LoRA (Hu et al., 2021): a low-rank update W + alpha/r · A·B beside a kernel, chosen per stage, merged for serving.

Linear layers of the towers' Transformer blocks (fused q/k/v, cross-attention query and key/value, attention output,
MLP fc1/fc2) add `lora_a` [*in, r] and `lora_b` [r, *out] to their `kernel` [*in, *out] when given a `LoRA`. B starts
at zero, so an adapted model equals its base at init. `stages.<name>.lora = {'towers': ('image', 'text'), 'rank': 8,
'alpha': 16}` turns it on: those towers get adapters and their own weights are frozen in that stage (the adapters
train, and so does everything outside the towers: projections, pools, heads, unless `frozen` says otherwise); a stage
without `lora` freezes the adapters, which reach it through the stage's `carry` like any other param. `merge` folds
them into the kernels, so inference and export see a plain model.
"""

import dataclasses
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import flax.traverse_util
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from crucible_jax.common_types import LORA_RANK, MODALITIES

ADAPTERS = ("lora_a", "lora_b")  # the adapter params of an adapted kernel
ADAPTER_PATTERN = r"/lora_[ab]$"  # a regex over '/'-joined param paths matching exactly the adapter params
STAGE_FIELDS = ("towers", "rank", "alpha")


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Rank and alpha of the adapters of one tower; the update is scaled by alpha / rank."""

  rank: int
  alpha: float

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def adapter_delta(module: nn.Module, x: Float[Array, "..."], kernel_shape: tuple[int, ...], in_names: tuple,
                  out_names: tuple, lora: LoRA, dtype: Any, param_dtype: Any) -> Float[Array, "..."]:
  """alpha/r · (x·A)·B, with `lora_a`/`lora_b` made in `module` beside its kernel of `kernel_shape` = (*in, *out)."""
  n_in = len(in_names)
  in_shape, out_shape = kernel_shape[:n_in], kernel_shape[n_in:]
  init_a = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=n_in)
  a = module.param("lora_a", nn.with_logical_partitioning(init_a, (*in_names, LORA_RANK)), (*in_shape, lora.rank),
                   param_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(), (LORA_RANK, *out_names)),
                   (lora.rank, *out_shape), param_dtype)
  h = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=n_in)
  return jnp.tensordot(h, b.astype(dtype), axes=1) * jnp.asarray(lora.scale, dtype)


class Dense(nn.Dense):
  """`nn.Dense` (same params) plus a LoRA update of its kernel when `lora` is set."""

  lora: LoRA | None = None
  names: tuple[str, str] = (None, None)  # logical (in, out) names of the kernel, for the adapters

  @nn.compact
  def __call__(self, inputs: Float[Array, "... i"]) -> Float[Array, "... o"]:
    y = super().__call__(inputs)
    if self.lora is None:
      return y
    kernel_shape = (inputs.shape[-1], self.features)
    return y + adapter_delta(self, inputs, kernel_shape, self.names[:1], self.names[1:], self.lora, self.dtype,
                             self.param_dtype)


def stage_lora(stage: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], LoRA] | None:
  """(towers, LoRA) of a stage's `lora` field (None when absent or empty); ValueError naming `where`."""
  spec = stage.get("lora")
  if not spec:
    return None
  spec = dict(spec)
  unknown = sorted(set(spec) - set(STAGE_FIELDS))
  if unknown:
    raise ValueError(f"{where}.lora has unknown fields {unknown}; known: {STAGE_FIELDS}")
  towers = tuple(spec.pop("towers", ()))
  if not towers or len(set(towers)) != len(towers) or not set(towers) <= set(MODALITIES):
    raise ValueError(f"{where}.lora.towers={towers}: expected distinct modalities from {MODALITIES}")
  return towers, lora_of(spec, f"{where}.lora")


def lora_of(spec: Mapping[str, Any], where: str) -> LoRA:
  """The LoRA of {rank, alpha (default: rank)}; ValueError naming `where`."""
  rank, alpha = spec.get("rank"), spec.get("alpha", spec.get("rank"))
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"{where}.rank={rank!r} must be an integer >= 1")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"{where}.alpha={alpha!r} must be a positive number")
  return LoRA(rank, float(alpha))


def run_adapters(stages: Mapping[str, Any], order: Iterable[str]) -> dict[str, LoRA]:
  """Tower -> LoRA over the stages of `order`; ValueError when two stages give one tower different adapters."""
  adapters: dict[str, LoRA] = {}
  for name in order:
    found = stage_lora(stages[name], f"stages.{name}")
    for tower in found[0] if found else ():
      if adapters.setdefault(tower, found[1]) != found[1]:
        raise ValueError(f"stages.{name}.lora gives tower {tower!r} {found[1]}, another stage {adapters[tower]}: "
                         f"a tower has one set of adapters per run")
  return adapters


def frozen_patterns(stage: Mapping[str, Any], adapters: Mapping[str, LoRA]) -> tuple[str, ...]:
  """Param regexes a stage freezes for LoRA: the base weights of its LoRA towers, the adapters of the others."""
  found = stage_lora(stage, "stage")
  on = found[0] if found else ()
  base = [rf"^encoders_{t}/(?!.*{ADAPTER_PATTERN})" for t in on]
  idle = [rf"^encoders_{t}/.*{ADAPTER_PATTERN}" for t in adapters if t not in on]
  return (*base, *idle)


def merge(params: Any, adapters: Mapping[str, LoRA]) -> Any:
  """`params` with every adapter folded into its kernel (W + alpha/r · A·B) and the adapter params dropped."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = {k: v for k, v in flat.items() if not re.search(ADAPTER_PATTERN, k)}
  for path in (k for k in flat if k.endswith("/lora_a")):
    tower = next((t for t in adapters if path.startswith(f"encoders_{t}/")), None)
    if tower is None:
      raise ValueError(f"adapter {path} belongs to no tower of {sorted(adapters)}")
    parent = path.removesuffix("/lora_a")
    a, b, kernel = flat[path], flat[f"{parent}/lora_b"], flat[f"{parent}/kernel"]
    update = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1) * adapters[tower].scale
    out[f"{parent}/kernel"] = (jnp.asarray(kernel, jnp.float32) + update).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(out, sep="/")


def count(params: Any) -> tuple[int, int]:
  """(adapter params, all params) of a param tree (arrays or ShapeDtypeStructs)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  sizes = {k: int(np.prod(v.shape)) for k, v in flat.items()}
  return sum(s for k, s in sizes.items() if re.search(ADAPTER_PATTERN, k)), sum(sizes.values())
