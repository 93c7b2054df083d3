"""Pooling, the projection into the shared embedding space, and task classifiers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from crucible_jax.common_types import CLASSES, EMBED, JOINT, MLP
from crucible_jax.models.layers import Dtype, Mlp, MultiHeadAttention, Style, dense, layer_norm, logical

L2_EPS = 1e-12
# O(1) queries: at ViT's usual 0.02 every slot attends uniformly at init, so the slots start (and for hundreds of
# steps stay) alike; order-aware read-out needs them to look at different places from the first step.
QUERY_INIT_STD = 1.0
# <modality>.pool: how a tower's tokens become the vector JointProjection reads. "slots" is the QueryPool read-out
# (flattened); "cls" token 0 (CLIP image); "map" one learned probe (SigLIP image); "mean" masked mean; "eot" the
# position of the largest token id (CLIP's end-of-text); "last" the last position (SigLIP text).
POOLS: tuple[str, ...] = ("slots", "cls", "map", "mean", "eot", "last")


def position_targets(labels: Int[Array, "b p"], lengths: Int[Array, "b"], end: int) -> Int[Array, "b p"]:
  """Per-position class of label sequences: the label, or `end` (a position head's last class) past each length.

  numpy in, numpy out (host evaluators); jax arrays or tracers in, jax out.
  """
  xp = jnp if isinstance(labels, jax.Array) or isinstance(lengths, jax.Array) else np
  inside = xp.arange(labels.shape[1])[None, :] < xp.asarray(lengths)[:, None]
  return xp.where(inside, labels, end)


def masked_mean_pool(tokens: Float[Array, "b n d"], mask: Bool[Array, "b n"]) -> Float[Array, "b d"]:
  """Mean over valid tokens (accumulated in f32); a sample with no valid token pools to 0."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(tokens.astype(jnp.float32) * weights, axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return (total / count).astype(tokens.dtype)


def l2_normalize(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """x / |x| in f32; the zero vector stays zero."""
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + L2_EPS))


class JointProjection(nn.Module):
  """Dense into the shared `joint_dim` space, then L2-normalise in f32 (the contrastive embedding)."""

  joint_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, pooled: Float[Array, "b d"]) -> Float[Array, "b j"]:
    projected = dense(self.joint_dim, (EMBED, JOINT), dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                      use_bias=self.use_bias)(pooled)
    return l2_normalize(projected)


class ClassifierHead(nn.Module):
  """LN (+ optional gelu MLP of `hidden` units) + Dense to `num_classes` f32 logits.

  `normalize=False` skips the LN for inputs whose scale is the signal, such as a sum of per-item messages.
  """

  num_classes: int
  hidden: int | None = None
  normalize: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... k"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.normalize:
      x = layer_norm(name="ln", **kw)(x)
    if self.hidden:
      x = x + Mlp(self.hidden, name="mlp", **kw)(x)
    return dense(self.num_classes, (EMBED, CLASSES), name="logits", **kw)(x).astype(jnp.float32)


class QueryPool(nn.Module):
  """Attention pooling with learned queries (big_vision's MAP head): [B, N, d] tokens → [B, Q, d] slots.

  Unlike a mean, each slot can read a different place of the sequence, so the slots keep order — the digit at
  position k of "371" vs "137" — that a mean over tokens washes out.
  """

  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Float[Array, "b n d"], mask: Bool[Array, "b n"]) -> Float[Array, "b q d"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = tokens.shape[-1]
    queries = self.param("queries", logical(nn.initializers.normal(QUERY_INIT_STD), (None, EMBED)),
                         (self.num_queries, width), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0], self.num_queries, width))
    context = layer_norm(name="ln_tokens", **kw)(tokens)
    slots = MultiHeadAttention(self.num_heads, name="attn", **kw)(queries, context, mask=mask)
    slots = slots + Mlp(2 * width, name="mlp", **kw)(layer_norm(name="ln_slots", **kw)(slots))
    return slots


class SlotAnswerHead(nn.Module):
  """VQA answers from a sum over the image's digit slots (Deep Sets): each slot, tagged with its index and read in
  the light of the question, sends a message; counts, sums, parities and "is there a d?" are functions of the sum
  of per-digit messages, which a head over the flattened slots has to discover pairwise."""

  num_classes: int
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, question: Float[Array, "b d"], slots: Float[Array, "b s e"]) -> Float[Array, "b k"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, num_slots = slots.shape[:2]
    index = jnp.broadcast_to(jnp.eye(num_slots, dtype=self.dtype), (batch, num_slots, num_slots))
    asked = jnp.broadcast_to(question[:, None].astype(self.dtype), (batch, num_slots, question.shape[-1]))
    x = jnp.concatenate([layer_norm(name="ln_slots", **kw)(slots), index, asked], axis=-1)
    message = nn.gelu(dense(self.hidden, (EMBED, MLP), name="message_in", **kw)(x))
    message = dense(self.hidden, (MLP, EMBED), name="message_out", **kw)(message)
    # no LN on the sum: it would divide out the magnitude that carries "how many" and "how much"
    answer = ClassifierHead(self.num_classes, hidden=self.hidden, normalize=False, name="answer", **kw)
    return answer(jnp.sum(message, axis=1))


class TokenPool(nn.Module):
  """One vector per sample from a tower's tokens, by `kind` (POOLS other than "slots")."""

  kind: str
  num_heads: int
  mlp_dim: int
  style: Style = Style()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Float[Array, "b n d"], mask: Bool[Array, "b n"],
               ids: Int[Array, "b n"] | None = None) -> Float[Array, "b d"]:
    if self.kind == "cls":
      return tokens[:, 0]
    if self.kind == "last":
      return tokens[:, -1]
    if self.kind == "mean":
      return masked_mean_pool(tokens, mask)
    if self.kind == "eot":
      if ids is None:
        raise ValueError("pool='eot' reads the token ids; this tower has none (use it on text)")
      return jnp.take_along_axis(tokens, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
    if self.kind == "map":  # SigLIP's MultiheadAttentionPoolingHead: attend, then x + mlp(LN(x))
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      width = tokens.shape[-1]
      probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, EMBED)), (1, width),
                         self.param_dtype)
      probe = jnp.broadcast_to(probe.astype(self.dtype), (tokens.shape[0], 1, width))
      x = MultiHeadAttention(self.num_heads, name="attn", **kw)(probe, tokens, mask=mask)
      x = x + Mlp(self.mlp_dim, act=self.style.act, name="mlp", **kw)(layer_norm(name="ln", style=self.style, **kw)(x))
      return x[:, 0]
    raise ValueError(f"pool {self.kind!r}: expected one of {POOLS[1:]}")
