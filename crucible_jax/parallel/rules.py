"""Logical axis rules (one table) and the NamedShardings they give params, optimizer state and batches.

Models name every param dim with a logical axis (`crucible_jax.common_types`); a layout maps those names to mesh
axes. Resolution follows Linen's: for each dim, the first rule for its name whose mesh axes are still unused by
earlier dims of the same array wins. On top of that a mesh axis that does not divide the dim is dropped for that
array (the dim is replicated over it), so tiny models run on any mesh.
"""

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from crucible_jax.common_types import (BATCH, CLASSES, EMBED, HEADS, JOINT, KV, LENGTH, LORA_RANK, MLP, NORM, PATCH,
                                       VOCAB)
from crucible_jax.parallel.mesh import data_axes

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

_BATCH_RULE = (BATCH, ("data", "fsdp"))
_UNSHARDED = tuple((name, None) for name in (LENGTH, KV, PATCH, CLASSES, NORM, LORA_RANK))

LOGICAL_AXIS_RULES: dict[str, Rules] = {
    # Pure data parallel: every param replicated, the batch split over data and fsdp.
    "dp": (_BATCH_RULE, *((name, None) for name in (EMBED, MLP, HEADS, VOCAB, JOINT)), *_UNSHARDED),
    # ZeRO-3 style: each param split along its width over fsdp (another dim when it has no embed dim).
    "fsdp": (
        _BATCH_RULE,
        (EMBED, "fsdp"),
        (MLP, "fsdp"),
        (HEADS, "fsdp"),
        (VOCAB, "fsdp"),
        (JOINT, "fsdp"),
        *_UNSHARDED,
    ),
    # FSDP over the width plus Megatron-style tensor parallelism of MLP hidden units, heads and vocabulary.
    "fsdp_tp": (
        _BATCH_RULE,
        (EMBED, "fsdp"),
        (MLP, "tensor"),
        (HEADS, "tensor"),
        (VOCAB, "tensor"),
        (JOINT, "fsdp"),
        (MLP, "fsdp"),
        (VOCAB, "fsdp"),
        *_UNSHARDED,
    ),
}


def rules_for(layout: str) -> Rules:
  """The rules of `layout`, in the form `nn.logical_axis_rules` and `nn.logical_to_mesh_sharding` take."""
  if layout not in LOGICAL_AXIS_RULES:
    raise ValueError(f"unknown sharding layout {layout!r}; choose one of {sorted(LOGICAL_AXIS_RULES)}")
  return LOGICAL_AXIS_RULES[layout]


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def spec_for_shape(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
  """PartitionSpec for an array of `shape` with logical dim `names`, dropping mesh axes that do not divide."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match the array shape {shape}")
  known = {name for name, _ in rules}
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for name, size in zip(names, shape):
    if name is not None and name not in known:
      raise ValueError(f"logical axis {name!r} has no rule; add it to LOGICAL_AXIS_RULES (rules: {sorted(known)})")
    chosen: tuple[str, ...] = ()
    for rule_name, mesh_axes in rules:
      candidate = _as_tuple(mesh_axes)
      if rule_name != name or used.intersection(candidate):
        continue
      candidate = tuple(axis for axis in candidate if mesh.shape.get(axis, 1) > 1)
      while candidate and size % int(np.prod([mesh.shape[a] for a in candidate])):
        candidate = candidate[:-1]
      if candidate or mesh_axes is None:
        chosen = candidate
        break
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return P(*spec)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Tree of NamedShardings for a tree holding `nn.LogicallyPartitioned` boxes (e.g. from `jax.eval_shape`).

  Each box becomes one sharding (a prefix of the box, so it works as `out_shardings` of a jitted init that
  returns boxes); unboxed leaves (step counters, scalars) are replicated.
  """

  def sharding(leaf: Any) -> NamedSharding:
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for_shape(tuple(leaf.names), tuple(leaf.value.shape), mesh, rules))
    if isinstance(leaf, nn.Partitioned):  # names are mesh axes already
      return NamedSharding(mesh, P(*leaf.names))
    return replicated(mesh)

  return jax.tree.map(sharding, boxed_tree, is_leaf=_is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading (batch) dim split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(data_axes()))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())
