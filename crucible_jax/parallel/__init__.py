"""Parallelism: device mesh, logical-axis sharding rules, mixed precision, compressed gradient reduction."""

from crucible_jax.parallel.compression import (METHODS, collective_bytes, init_compression_state,
                                               make_compressed_value_and_grad)
from crucible_jax.parallel.distributed import apply_xla_flags, initialize_distributed, overlap_xla_flags
from crucible_jax.parallel.mesh import (MESH_AXES, build_mesh, check_batch_divisible, data_axes,
                                        num_data_shards)
from crucible_jax.parallel.precision import DynamicLossScale, Policy, all_finite, select_tree
from crucible_jax.parallel.rules import (LOGICAL_AXIS_RULES, batch_sharding, logical_to_shardings, replicated,
                                         rules_for)

__all__ = [
    "DynamicLossScale", "LOGICAL_AXIS_RULES", "METHODS", "MESH_AXES", "Policy", "all_finite", "apply_xla_flags",
    "batch_sharding", "build_mesh", "check_batch_divisible", "collective_bytes", "data_axes",
    "init_compression_state", "initialize_distributed", "logical_to_shardings", "make_compressed_value_and_grad",
    "num_data_shards", "overlap_xla_flags", "replicated", "rules_for", "select_tree",
]
