"""GradCache (Gao et al., 2021): a contrastive stage's global-batch gradients with one chunk's activations alive.

1. Embed: the stage's forward on each of k chunks in a `lax.scan`, keeping only its outputs (embeddings, logits).
2. Loss: the objective on the whole batch's outputs — the dense or ring-sharded contrastive loss sees every pair —
   and its gradient with respect to those outputs.
3. Re-run each chunk's forward under `jax.vjp` and pull its rows' output gradients back to the params, summing.

Per-sample terms (pretraining, ASR, tagging, ...) have per-row output gradients, so for them step 3 is plain gradient
accumulation. Chunk i holds rows i, i+k, i+2k, ...: a batch sharded in contiguous blocks over the data axis gives
every device an equal, local share of each chunk. Chunk i draws its dropout/routing noise from `fold_in(rng, i)` in
both passes, so the gradients equal the full-batch step's exactly when the forward treats samples independently
and deterministically (no dropout, routing noise or train-time augmentation); outputs without a batch axis (e.g.
`logit_scale`) must not depend on the batch, and their gradient is taken once.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]
Forward = Callable[[Any, Batch, jax.Array], Any]
Objective = Callable[[Any, Batch], tuple[jax.Array, dict]]


def split_chunks(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with chunk i = rows i, i+k, ..."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def join_chunks(x: jax.Array) -> jax.Array:
  """The inverse of `split_chunks`."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _layout(forward: Forward, params: Any, batch: Batch, chunk: Batch, rng: jax.Array) -> tuple[Any, list, list]:
  """(outputs treedef, per leaf: has a batch axis, per leaf: is differentiable), from shapes alone."""
  full, part = jax.eval_shape(forward, params, batch, rng), jax.eval_shape(forward, params, chunk, rng)
  size, chunk_size = len(next(iter(batch.values()))), len(next(iter(chunk.values())))
  full_leaves, treedef = jax.tree.flatten(full)
  batched = [f.ndim > 0 and f.shape[0] == size and p.shape[0] == chunk_size
             for f, p in zip(full_leaves, jax.tree.leaves(part))]
  return treedef, batched, [jnp.issubdtype(f.dtype, jnp.inexact) for f in full_leaves]


def make_grad_cache_fn(forward: Forward, objective: Objective, accum_steps: int) -> Callable:
  """`grad_fn(params, batch, comp_state, rng) -> ((loss, metrics), grads, comp_state)` for `make_train_step`."""
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  k = accum_steps

  def grad_fn(params: Any, batch: Batch, comp_state: Any, rng: jax.Array) -> tuple[tuple[jax.Array, dict], Any, Any]:
    size = len(next(iter(batch.values())))
    if size % k:
      raise ValueError(f"accum_steps={k} does not divide the global batch of {size}")
    chunks = jax.tree.map(lambda x: split_chunks(x, k), batch)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))
    treedef, batched, inexact = _layout(forward, params, batch, jax.tree.map(lambda x: x[0], chunks), rng)

    def float_outputs(p: Any, chunk: Batch, r: jax.Array) -> list[jax.Array]:
      return [x for x, d in zip(jax.tree.leaves(forward(p, chunk, r)), inexact) if d]

    def embed(_, xs):
      return None, jax.tree.leaves(forward(params, *xs))

    _, stacked = jax.lax.scan(embed, None, (chunks, rngs))
    leaves = [join_chunks(x) if b else x[0] for x, b in zip(stacked, batched)]

    def loss_of(floats: list[jax.Array]) -> tuple[jax.Array, dict]:
      it = iter(floats)
      outputs = treedef.unflatten([next(it) if d else x for x, d in zip(leaves, inexact)])
      return objective(outputs, batch)

    (loss, metrics), cots = jax.value_and_grad(loss_of, has_aux=True)([x for x, d in zip(leaves, inexact) if d])
    float_batched = [b for b, d in zip(batched, inexact) if d]
    chunk_cots = [split_chunks(c, k) if b else c for c, b in zip(cots, float_batched)]

    def backward(acc: Any, xs: tuple) -> tuple[Any, None]:
      chunk, r, i, batch_cots = xs
      it = iter(batch_cots)
      cot = [next(it) if b else c * (i == 0).astype(c.dtype) for c, b in zip(cots, float_batched)]
      _, pull = jax.vjp(lambda p: float_outputs(p, chunk, r), params)
      return jax.tree.map(jnp.add, acc, pull(cot)[0]), None

    per_chunk = [c for c, b in zip(chunk_cots, float_batched) if b]
    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), (chunks, rngs, jnp.arange(k), per_chunk))
    return (loss, metrics), grads, comp_state

  return grad_fn
