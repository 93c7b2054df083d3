"""Pure train and eval steps: built once per stage, compiled once with `jax.jit`."""

import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from crucible_jax.parallel.precision import DynamicLossScale
from crucible_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Objective = Callable[[dict, Batch], tuple[jax.Array, dict]]
Metrics = dict[str, jax.Array]
Rules = tuple[tuple[str, Any], ...]


# XLA:CPU compiles loop fusions with LLVM; at O1 the steps compile ~25% faster than at O2 and run as fast (their time
# is in library GEMMs; BUILD_NOTES.md, "compile options"). Programs run once (init) compile at O0 with the legacy
# emitters, ~2x faster still.
CPU_STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
# XLA:CPU's default copy insertion copies every Adam moment at entry when the skip-on-non-finite `where` reads the
# old state beside the new (506 copies in the CLIP bench step, all of mu and nu); region analysis proves them unneeded.
CPU_TRAIN_STEP_COMPILER_OPTIONS = {**CPU_STEP_COMPILER_OPTIONS, "xla_cpu_copy_insertion_use_region_analysis": True}
CPU_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compiler_options(options: Mapping[str, Any], platform: str) -> dict[str, Any] | None:
  """`options` for a CPU program, less those the XLA_FLAGS environment sets (the user's flags win); None elsewhere."""
  if platform != "cpu":
    return None
  given = {flag.split("=")[0].lstrip("-") for flag in os.environ.get("XLA_FLAGS", "").split()}
  return {k: v for k, v in options.items() if k not in given}


def all_finite(tree: Any) -> jax.Array:
  """True when every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def stop_frozen(params: Any, frozen: Any) -> Any:
  """Cut gradients of frozen params so XLA drops their backward computation, not just zeroes its result."""
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def make_forward_fn(model: nn.Module, heads: tuple[str, ...], frozen: Any, rules: Rules = (),
                    route: bool = True) -> Callable[[Any, Batch, jax.Array], dict]:
  """`forward(params, batch, rng) -> outputs` of one training stage (dropout and routing rngs from `rng`)."""

  def forward(params: Any, batch: Batch, rng: jax.Array) -> dict:
    dropout_rng, router_rng = jax.random.split(rng)
    with nn.logical_axis_rules(rules):
      return model.apply({"params": stop_frozen(params, frozen)}, batch, train=True, heads=heads, route=route,
                         rngs={"dropout": dropout_rng, "routing": router_rng})

  return forward


def make_loss_fn(model: nn.Module, objective: Objective, heads: tuple[str, ...], frozen: Any,
                 rules: Rules = (), route: bool = True) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` for one stage; activations constrained by `rules`;
  `route=False` bypasses the router's plan: every present modality is encoded (the stage's `route` field)."""
  forward = make_forward_fn(model, heads, frozen, rules, route)

  def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    return objective(forward(params, batch, rng), batch)

  return loss_fn


def _scaled_value_and_grad(loss_fn: Callable, scaler: DynamicLossScale, params: Any, batch: Batch,
                           rng: jax.Array) -> tuple[tuple[jax.Array, Metrics], Any]:
  """((loss, metrics), grads) of `loss_fn`, differentiated as loss × scale so small f16 grads survive, unscaled."""

  def scaled(p: Any, b: Batch, r: jax.Array) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    loss, metrics = loss_fn(p, b, r)
    return scaler.scale_loss(loss.astype(jnp.float32)), (loss, metrics)

  (_, (loss, metrics)), grads = jax.value_and_grad(scaled, has_aux=True)(params, batch, rng)
  return (loss, metrics), scaler.unscale(grads)


def make_train_step(loss_fn: Callable, *, grad_fn: Callable | None = None
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """`train_step(state, batch, rng) -> (state, metrics)`; a non-finite loss or gradient skips the update.

  `grad_fn(params, batch, comp_state, rng) -> ((loss, metrics), grads, comp_state)` replaces plain autodiff
  when gradients are reduced explicitly (compression). With `state.loss_scale` (float16 compute) the loss is
  scaled before differentiation; an overflowed step is skipped and halves the scale, `period` good steps in a row
  double it. Metric `finite` is False only for what the loss scale cannot explain (a non-finite loss, or an
  overflow at the smallest scale), so `nan_policy='abort'` does not trip on routine f16 overflows.
  """

  def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    scaler = state.loss_scale
    if grad_fn is None and scaler is None:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
      comp_state = state.comp_state
    elif grad_fn is None:
      (loss, metrics), grads = _scaled_value_and_grad(loss_fn, scaler, state.params, batch, rng)
      comp_state = state.comp_state
    elif scaler is None:
      (loss, metrics), grads, comp_state = grad_fn(state.params, batch, state.comp_state, rng)
    else:
      raise ValueError("float16 loss scaling with gradient compression is not supported: the compressed "
                       "reduction differentiates the unscaled loss; use compute bfloat16 or compression 'none'")
    loss_finite, grads_finite = jnp.isfinite(loss), all_finite(grads)
    finite = loss_finite & grads_finite
    updated = state.apply_gradients(grads).replace(comp_state=comp_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), finite=finite)
    if scaler is not None:
      new_state = new_state.replace(loss_scale=scaler.update(grads_finite))
      expected_overflow = loss_finite & ~grads_finite & (scaler.scale > scaler.min_scale)
      metrics.update(finite=finite | expected_overflow, loss_scale=scaler.scale,
                     overflow=(~grads_finite).astype(jnp.int32))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, heads: tuple[str, ...], rules: Rules = ()) -> Callable[[Any, Batch], dict]:
  """`eval_step(params, batch) -> outputs` with deterministic routing and no dropout."""

  def eval_step(params: Any, batch: Batch) -> dict:
    with nn.logical_axis_rules(rules):
      return model.apply({"params": params}, batch, train=False, heads=heads)

  return eval_step
