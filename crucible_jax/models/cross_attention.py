"""Cross-modal attention: queries from one modality, keys/values from another (optionally Flamingo-gated)."""

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from crucible_jax.models.layers import TOKENS, Dtype, Mlp, MultiHeadAttention, layer_norm, logical


class GatedResidual(nn.Module):
  """x + tanh(gate) * update with a scalar gate initialised to 0 (identity at init), or x + update."""

  gated: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "..."], update: Float[Array, "..."]) -> Float[Array, "..."]:
    if not self.gated:
      return x + update
    gate = self.param("gate", logical(nn.initializers.zeros_init(), ()), (), self.param_dtype)
    return x + jnp.tanh(gate).astype(update.dtype) * update


class CrossModalAttention(nn.Module):
  """A's tokens attend to B's tokens (B's padding masked out); residual on A, gated if `gated`."""

  num_heads: int
  gated: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      a: Float[Array, "b n da"],
      b: Float[Array, "b m db"],
      b_mask: Bool[Array, "b m"] | None = None,
  ) -> Float[Array, "b n da"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries = layer_norm(name="ln_query", **kw)(a)
    context = layer_norm(name="ln_context", **kw)(b)
    update = MultiHeadAttention(self.num_heads, name="attn", **kw)(queries, context, b_mask)
    out = GatedResidual(self.gated, self.param_dtype, name="residual")(a.astype(self.dtype), update)
    return nn.with_logical_constraint(out, TOKENS)


class CrossModalLayer(nn.Module):
  """CrossModalAttention followed by a (gated) pre-LN MLP on the query side."""

  num_heads: int
  mlp_dim: int
  gated: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, a: Float[Array, "b n da"], b: Float[Array, "b m db"], b_mask: Bool[Array, "b m"] | None
  ) -> Float[Array, "b n da"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CrossModalAttention(self.num_heads, self.gated, name="cross_attn", **kw)(a, b, b_mask)
    update = Mlp(self.mlp_dim, name="mlp", **kw)(layer_norm(name="ln_mlp", **kw)(x))
    out = GatedResidual(self.gated, self.param_dtype, name="mlp_residual")(x, update)
    return nn.with_logical_constraint(out, TOKENS)


class BidirectionalFusionBlock(nn.Module):
  """A attends to B and B attends to A (both read the inputs, co-attention style), each then an MLP."""

  num_heads_a: int
  mlp_dim_a: int
  num_heads_b: int
  mlp_dim_b: int
  gated: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      a: Float[Array, "b n da"],
      a_mask: Bool[Array, "b n"] | None,
      b: Float[Array, "b m db"],
      b_mask: Bool[Array, "b m"] | None,
  ) -> tuple[Float[Array, "b n da"], Float[Array, "b m db"]]:
    kw = dict(gated=self.gated, dtype=self.dtype, param_dtype=self.param_dtype)
    new_a = CrossModalLayer(self.num_heads_a, self.mlp_dim_a, name="a_from_b", **kw)(a, b, b_mask)
    new_b = CrossModalLayer(self.num_heads_b, self.mlp_dim_b, name="b_from_a", **kw)(b, a, a_mask)
    return new_a, new_b
