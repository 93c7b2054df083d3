"""What every benchmark shares: the machine's measured matmul peak, timing, and where it ran."""

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def device_info(mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Device kind, count and mesh shape, for the JSON header."""
  device = jax.devices()[0]
  info = {"device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "jax": jax.__version__}
  if mesh is not None:
    info["mesh"] = dict(mesh.shape)
  return info


def time_call(fn: Callable[[], Any], *, iters: int, warmup: int = 1) -> float:
  """Best-of wall seconds of `fn()` (blocked until ready) over `iters` runs after `warmup` runs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 3072, 4096), iters: int = 3,
                device: jax.Device | None = None, repeats: int = 1) -> dict[str, Any]:
  """The machine's achievable matmul FLOP/s: the best of large square matmuls on one device, measured now."""
  device = device or jax.devices()[0]
  best, per_size = 0.0, {}
  for n in sizes:
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype), device)
    b = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype), device)
    matmul = jax.jit(jnp.matmul)
    # `repeats` products queued back to back, one wait: a GPU's ~0.1 ms dispatch+sync per call would otherwise
    # count as matmul time (an H200 read 0.61 PFLOP/s at 8192^2 timed call by call)
    seconds = time_call(lambda: [matmul(a, b) for _ in range(repeats)][-1], iters=iters) / repeats
    per_size[n] = 2 * n**3 / seconds
    best = max(best, per_size[n])
  return {"peak_flops_per_s": best, "per_size_flops_per_s": {str(k): v for k, v in per_size.items()},
          "dtype": dtype}


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one device's share of a compiled XLA program (SPMD compiles one program that every device runs)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(a.get("flops", 0.0) for a in analysis))
  return float(analysis.get("flops", 0.0))
