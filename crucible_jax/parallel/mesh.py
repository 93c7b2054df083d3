"""The device mesh: axes (data, fsdp, tensor), sizes with one -1 to fill, topology-aware device order.

Meshes use `AxisType.Auto` on purpose: Linen's `nn.with_logical_constraint` and GSPMD sharding propagation
work there, whereas `jax.make_mesh`'s default (`Explicit`) wants sharding-in-types everywhere. Enter a mesh with
`jax.set_mesh(mesh)` (the bare `with mesh:` is deprecated).

Device order comes from `mesh_utils.create_device_mesh`, so the last axes (`tensor`, then `fsdp`) are the
innermost ones: neighbours inside one NVLink island / host. With several processes the mesh is built by
`create_hybrid_device_mesh`, with the process (host) dimension on `data` (or on `fsdp` when `data` cannot hold
it), so only the data-parallel gradient reduction crosses the slow network.
"""

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def data_axes() -> tuple[str, str]:
  """Mesh axes the batch is split over (data parallel and fully-sharded data parallel)."""
  return ("data", "fsdp")


def resolve_axis_sizes(axes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor) for `num_devices`; missing axes are 1, one -1 takes the rest."""
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown}; mesh axes are {MESH_AXES}")
  sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill}")
  bad = {name: size for name, size in sizes.items() if size <= 0 and size != -1}
  if bad:
    raise ValueError(f"mesh axis sizes must be positive (or one -1 = fill), got {bad}")
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if fill:
    if num_devices % known:
      raise ValueError(
          f"cannot fill mesh axis {fill[0]!r}: {num_devices} devices are not divisible by the other axes "
          f"({ {k: v for k, v in sizes.items() if v != -1} })")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"mesh axes {sizes} multiply to {known}, but there are {num_devices} devices")
  return tuple(sizes[name] for name in MESH_AXES)


def _hybrid_device_array(shape: tuple[int, ...], devices: Sequence[Any], num_processes: int) -> np.ndarray:
  """Devices for a multi-host mesh: processes along `data` (else `fsdp`), local devices inside."""
  for axis in (0, 1):
    if shape[axis] % num_processes == 0:
      per_host = list(shape)
      per_host[axis] //= num_processes
      across_hosts = [1, 1, 1]
      across_hosts[axis] = num_processes
      return mesh_utils.create_hybrid_device_mesh(per_host, across_hosts, devices, process_is_granule=True)
  raise ValueError(
      f"with {num_processes} processes, mesh axis 'data' ({shape[0]}) or 'fsdp' ({shape[1]}) must be divisible "
      "by the process count, so that only data-parallel traffic crosses hosts")


def device_grid(shape: tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as `shape`, innermost axes on nearby devices; hosts apart only along data (or fsdp)."""
  num_processes = len({d.process_index for d in devices})
  if num_processes > 1:
    return _hybrid_device_array(shape, devices, num_processes)
  return mesh_utils.create_device_mesh(shape, devices)


def build_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) Auto-typed mesh over `devices` (default: all), sizes from `axes`."""
  devices = list(jax.devices() if devices is None else devices)
  grid = device_grid(resolve_axis_sizes(axes, len(devices)), devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_data_shards(mesh: Mesh) -> int:
  """How many pieces the batch is cut into (product of the data axes)."""
  return int(np.prod([mesh.shape[name] for name in data_axes()]))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """Raise ValueError if `global_batch` cannot be split evenly over the mesh's data axes."""
  shards = num_data_shards(mesh)
  if global_batch <= 0 or global_batch % shards:
    sizes = ", ".join(f"{name}={mesh.shape[name]}" for name in data_axes())
    raise ValueError(
        f"batch_size {global_batch} must be a positive multiple of {shards}, the number of data shards "
        f"(mesh axes {sizes})")
