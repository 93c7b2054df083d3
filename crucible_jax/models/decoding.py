"""Autoregressive decoding with static shapes: greedy and beam search over a KV-cached step, plus a no-cache reference.

A `step(last_tokens [N], cache, index) -> (logits [N, V], cache)` runs one position of the decoder. Everything is
`lax.while_loop` over a fixed-size token buffer, so the whole decode compiles once under `jax.jit`. Beams are
flattened into the batch (row b * K + k), so the step never knows it is running a beam search.
Outputs are the generated tokens after BOS: EOS, then PAD to `max_len`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from crucible_jax.data.tokenizers.byte import BOS, EOS, PAD

Cache = Any
StepFn = Callable[[Int[Array, "n"], Cache, Int[Array, ""]], tuple[Float[Array, "n v"], Cache]]


def greedy_decode(step: StepFn, cache: Cache, batch_size: int, max_len: int, *, bos: int = BOS, eos: int = EOS,
                  pad: int = PAD) -> Int[Array, "b l"]:
  """Argmax decoding; stops early once every row has written EOS (the rest of the buffer stays PAD)."""

  def cond(carry):
    index, _, _, done, _ = carry
    return (index < max_len) & ~jnp.all(done)

  def body(carry):
    index, tokens, last, done, cache = carry
    logits, cache = step(last, cache, index)
    token = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
    return index + 1, tokens, token, done | (token == eos), cache

  init = (jnp.zeros((), jnp.int32), jnp.full((batch_size, max_len), pad, jnp.int32),
          jnp.full((batch_size,), bos, jnp.int32), jnp.zeros((batch_size,), bool), cache)
  return jax.lax.while_loop(cond, body, init)[1]


def _reorder(cache: Cache, beams: Int[Array, "b k"], rows: int) -> Cache:
  """Gather each cache leaf whose leading axis is the flattened beam batch by the surviving beams."""
  batch, width = beams.shape
  flat = (beams + width * jnp.arange(batch)[:, None]).reshape(-1)
  return jax.tree.map(lambda x: x[flat] if x.ndim and x.shape[0] == rows else x, cache)


def beam_search(step: StepFn, cache: Cache, batch_size: int, beam_size: int, max_len: int, *,
                length_alpha: float = 0.0, bos: int = BOS, eos: int = EOS, pad: int = PAD
                ) -> tuple[Int[Array, "b l"], Float[Array, "b"]]:
  """Best of `beam_size` beams per row (tokens, log-probability), the cache holding batch_size * beam_size rows.

  A finished beam stays in the beam with its score, extended only by PAD at no cost, so it competes with the live
  beams on total log-probability; the final pick divides by length**length_alpha (0: no normalisation). With
  beam_size 1 this is exactly greedy decoding.
  """
  rows = batch_size * beam_size

  def body(index, carry):
    seqs, scores, lengths, done, last, cache = carry
    logits, cache = step(last, cache, index)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch_size, beam_size, -1)
    vocab = logp.shape[-1]
    pad_only = jnp.full((vocab,), -jnp.inf).at[pad].set(0.0)
    logp = jnp.where(done[..., None], pad_only, logp)
    scores, flat = jax.lax.top_k((scores[..., None] + logp).reshape(batch_size, -1), beam_size)
    beams, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, beams.reshape(beams.shape + (1,) * (x.ndim - 2)), axis=1)
    seqs, lengths, done = pick(seqs), pick(lengths), pick(done)
    seqs = jax.lax.dynamic_update_slice(seqs, token[..., None], (0, 0, index))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == eos)
    return seqs, scores, lengths, done, token.reshape(-1), _reorder(cache, beams, rows)

  scores = jnp.full((batch_size, beam_size), -jnp.inf).at[:, 0].set(0.0)  # identical beams at start: keep one
  init = (jnp.full((batch_size, beam_size, max_len), pad, jnp.int32), scores,
          jnp.zeros((batch_size, beam_size), jnp.int32), jnp.zeros((batch_size, beam_size), bool),
          jnp.full((rows,), bos, jnp.int32), cache)
  seqs, scores, lengths, _, _, _ = jax.lax.fori_loop(0, max_len, body, init)
  ranked = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_alpha if length_alpha else scores
  best = jnp.argmax(ranked, axis=1)
  take = jnp.arange(batch_size)
  return seqs[take, best], scores[take, best]


def greedy_decode_reference(logits_fn: Callable[[Int[Array, "b l"]], Float[Array, "b l v"]], batch_size: int,
                            max_len: int, *, bos: int = BOS, eos: int = EOS, pad: int = PAD) -> Int[Array, "b l"]:
  """Greedy decoding with no cache: the full causal forward over the whole prefix buffer at every step (tests)."""

  def body(index, carry):
    tokens, done = carry
    inputs = jnp.concatenate([jnp.full((batch_size, 1), bos, jnp.int32), tokens[:, :-1]], axis=1)
    logits = jax.lax.dynamic_index_in_dim(logits_fn(inputs), index, axis=1, keepdims=False)
    token = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
    return tokens, done | (token == eos)

  init = (jnp.full((batch_size, max_len), pad, jnp.int32), jnp.zeros((batch_size,), bool))
  return jax.lax.fori_loop(0, max_len, body, init)[0]
