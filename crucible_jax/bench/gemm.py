"""The matmuls a program does, each timed alone at its own shape: the FLOP/s its GEMMs allow on this backend.

A train step cannot run faster than its matrix products run by themselves, so the FLOP-weighted speed of the
step's own `dot_general`s, each compiled and timed alone, is the ceiling a step-vs-peak target has to fit under.
"""

import collections
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from crucible_jax.bench.common import time_call


@dataclasses.dataclass(frozen=True)
class Dot:
  """One `dot_general` as traced: operand shapes and dtypes, dimension numbers, accumulation dtype."""

  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  lhs_dtype: str
  rhs_dtype: str
  dimension_numbers: tuple  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), as lax.dot_general takes it
  out_dtype: str | None

  @property
  def flops(self) -> int:
    """2 x (batch x lhs-free x rhs-free x contracted) elements: one multiply and one add per term."""
    (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
    rhs_free = [size for d, size in enumerate(self.rhs_shape) if d not in rhs_contract and d not in rhs_batch]
    return 2 * math.prod(self.lhs_shape) * math.prod(rhs_free)

  def __str__(self) -> str:
    return f"{self.lhs_dtype}{list(self.lhs_shape)} x {self.rhs_dtype}{list(self.rhs_shape)} {self.dimension_numbers}"


def _dots_of(jaxpr: jex.core.Jaxpr) -> collections.Counter:
  """Every dot_general in `jaxpr` with its execution count (scan bodies x length, the costliest cond branch)."""
  counts: collections.Counter = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.params.get("preferred_element_type")
      counts[Dot(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), str(rhs.dtype),
                 eqn.params["dimension_numbers"], None if out is None else str(np.dtype(out)))] += 1
    elif eqn.primitive.name == "cond":
      branches = [_dots_of(b.jaxpr) for b in eqn.params["branches"]]
      counts.update(max(branches, key=lambda c: sum(d.flops * n for d, n in c.items())))
    else:
      times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
      for sub in jex.core.jaxprs_in_params(eqn.params):
        for dot, n in _dots_of(sub).items():
          counts[dot] += n * times
  return counts


def program_dots(fn: Callable[..., Any], *args: Any) -> collections.Counter:
  """Counter of the matrix products `fn(*args)` performs, traced (not run); a while loop's body counts once."""
  # A jitted fn traces as itself: make_jaxpr would nest it, and a nested jit may not carry compiler options.
  traced = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
  return _dots_of(traced.jaxpr)


def _time_dot(dot: Dot, device: jax.Device, iters: int) -> float:
  """Best-of seconds of this one dot_general compiled alone on `device`, on random operands."""
  rng = np.random.default_rng(0)
  lhs = jax.device_put(jnp.asarray(rng.standard_normal(dot.lhs_shape), dot.lhs_dtype), device)
  rhs = jax.device_put(jnp.asarray(rng.standard_normal(dot.rhs_shape), dot.rhs_dtype), device)
  product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dimension_numbers, preferred_element_type=dot.out_dtype))
  return time_call(lambda: product(lhs, rhs), iters=iters)


def gemm_ceiling(dots: collections.Counter, *, iters: int = 5, device: jax.Device | None = None) -> dict[str, Any]:
  """Times each distinct dot alone; their FLOP-weighted FLOP/s is the best the program's matmuls reach here."""
  device = device or jax.devices()[0]
  rows, total_flops, total_s = [], 0, 0.0
  for dot, count in sorted(dots.items(), key=lambda item: -item[0].flops * item[1]):
    seconds = _time_dot(dot, device, iters)
    total_flops += dot.flops * count
    total_s += seconds * count
    rows.append({"dot": str(dot), "count": count, "flops": dot.flops, "seconds": seconds,
                 "flops_per_s": dot.flops / seconds})
  return {"dot_flops_per_step": total_flops, "dot_seconds_per_step": total_s,
          "flops_per_s": total_flops / total_s if total_s else 0.0, "distinct_dots": len(rows), "dots": rows}
