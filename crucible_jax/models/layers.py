"""Transformer building blocks; every param carries logical axis names so `parallel.rules` can shard it."""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from crucible_jax.common_types import BATCH, EMBED, HEADS, KV, LENGTH, MLP, NORM
from crucible_jax.models.lora import Dense, LoRA, adapter_delta

Dtype = Any
Initializer = Any

default_kernel_init = nn.initializers.lecun_normal()
TOKENS: tuple[str, str, str] = (BATCH, LENGTH, EMBED)


def logical(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
  """Shorthand for `nn.with_logical_partitioning`."""
  return nn.with_logical_partitioning(init, names)


def dense(
    features: int,
    names: tuple[str, str],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
    use_bias: bool = True,
    lora: LoRA | None = None,
) -> nn.Dense:
  """A Dense whose kernel is named `names` (in, out) and whose bias is named (out,); `lora` adds adapters."""
  if lora is not None:
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, lora=lora, names=names,
                 kernel_init=logical(default_kernel_init, names),
                 bias_init=logical(nn.initializers.zeros_init(), (names[1],)))
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=logical(default_kernel_init, names),
      bias_init=logical(nn.initializers.zeros_init(), (names[1],)),
      name=name,
  )


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": nn.gelu,  # tanh approximation (Flax's default; big_vision, SigLIP)
    "gelu": lambda x: nn.gelu(x, approximate=False),  # erf (torch.nn.GELU; open_clip, HF CLIP non-OpenAI)
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class Style:
  """The numerics a pretrained tower fixes: MLP activation and LayerNorm epsilon and variance formula."""

  act: str = "gelu_tanh"  # key of ACTIVATIONS
  norm_eps: float = 1e-6
  fast_variance: bool = True  # Flax's E[x²] - E[x]²; False = the two-pass variance torch computes


def layer_norm(*, dtype: Dtype, param_dtype: Dtype, name: str | None = None, style: Style = Style()) -> nn.LayerNorm:
  """LayerNorm with ("norm",) scale and bias; statistics are computed in f32 by Flax."""
  return nn.LayerNorm(
      epsilon=style.norm_eps,
      use_fast_variance=style.fast_variance,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=logical(nn.initializers.ones_init(), (NORM,)),
      bias_init=logical(nn.initializers.zeros_init(), (NORM,)),
      name=name,
  )


def as_attention_mask(mask: Bool[Array, "..."] | None, q_len: int) -> Bool[Array, "b q k"] | None:
  """Turn a key padding mask [B, Lk] or a full mask [B, Lq, Lk] into [B, Lq, Lk]."""
  if mask is None:
    return None
  if mask.ndim == 2:
    return jnp.broadcast_to(mask[:, None, :], (mask.shape[0], q_len, mask.shape[1]))
  if mask.ndim == 3:
    return mask
  raise ValueError(f"attention mask must be [B, Lk] or [B, Lq, Lk], got shape {mask.shape}")


class HeadProjection(nn.Module):
  """[B, L, embed] → `count` × [B, L, heads, kv]; kernel (embed, [count,] heads, kv) so each axis keeps its name.

  `count=3` is the fused q/k/v projection of self-attention: one wide GEMM instead of three narrow ones, whose
  [B, L, count, heads, kv] output is the GEMM's own row-major layout (a leading `count` axis cost a transpose).
  """

  num_heads: int
  head_dim: int
  count: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # low-rank adapters of the kernel

  @nn.compact
  def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "... b l h k"]:
    stacked = self.count > 1
    shape = (x.shape[-1], *((self.count,) if stacked else ()), self.num_heads, self.head_dim)
    names = (EMBED, *((None,) if stacked else ()), HEADS, KV)
    # fan-in is the embed axis alone: lecun_normal's default axes would count heads (and count) as fan-in too
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, len(shape))))
    kernel = self.param("kernel", logical(init, names), shape, self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), names[1:]), shape[1:], self.param_dtype)
    spec = "bld,dthk->blthk" if stacked else "bld,dhk->blhk"
    y = jnp.einsum(spec, x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    if self.lora is not None:
      y = y + adapter_delta(self, x, shape, names[:1], names[1:], self.lora, self.dtype, self.param_dtype)
    return tuple(y[:, :, i] for i in range(self.count)) if stacked else y


class HeadMerge(nn.Module):
  """[B, L, heads, kv] → [B, L, embed], kernel (heads, kv, embed)."""

  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # low-rank adapters of the kernel

  @nn.compact
  def __call__(self, x: Float[Array, "b l h k"]) -> Float[Array, "b l d"]:
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), (HEADS, KV, EMBED)),
                        (x.shape[-2], x.shape[-1], self.width), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), (EMBED,)), (self.width,), self.param_dtype)
    y = jnp.einsum("blhk,hkd->bld", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    if self.lora is not None:
      y = y + adapter_delta(self, x, kernel.shape, (HEADS, KV), (EMBED,), self.lora, self.dtype, self.param_dtype)
    return y


ATTENTION_KERNELS = ("xla", "cudnn")


class MultiHeadAttention(nn.Module):
  """Queries from `x`, keys/values from `context`; softmax in f32; rows with no valid key output zeros.

  `kernel="xla"` spells attention out as einsums (any backend, any dtype); "cudnn" calls cuDNN's fused flash
  attention (NVIDIA GPUs, bf16/f16), which never writes the [B, heads, Lq, Lk] logits to memory.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel: str = "xla"
  lora: LoRA | None = None  # low-rank adapters of the q/k/v and output projections

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b q d"],
      context: Float[Array, "b k c"] | None = None,
      mask: Bool[Array, "..."] | None = None,
  ) -> Float[Array, "b q d"]:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
    head_dim = width // self.num_heads

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    if context is None:
      query, key, value = HeadProjection(self.num_heads, head_dim, count=3, name="qkv", **kw)(x)
    else:
      query = HeadProjection(self.num_heads, head_dim, name="query", **kw)(x)
      key, value = HeadProjection(self.num_heads, head_dim, count=2, name="kv", **kw)(context)
    full_mask = as_attention_mask(mask, x.shape[1])
    if self.kernel == "cudnn":
      attended = jax.nn.dot_product_attention(
          query, key, value, mask=None if full_mask is None else full_mask[:, None], implementation="cudnn")
      if full_mask is not None:
        attended = jnp.where(jnp.any(full_mask, axis=-1)[:, :, None, None], attended, 0.0)
    elif self.kernel == "xla":
      attended = self._einsum_attention(query, key, value, full_mask)
    else:
      raise ValueError(f"attention kernel {self.kernel!r}: expected one of {ATTENTION_KERNELS}")
    return HeadMerge(width, name="out", **kw)(attended)

  def _einsum_attention(
      self, query: Float[Array, "b q h k"], key: Float[Array, "b l h k"], value: Float[Array, "b l h k"],
      full_mask: Bool[Array, "b q l"] | None,
  ) -> Float[Array, "b q h k"]:
    """Scores, masked f32 softmax and mixing as plain einsums: runs on every backend and in every dtype."""
    query = query * jnp.asarray(query.shape[-1]**-0.5, self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if full_mask is not None:
      logits = jnp.where(full_mask[:, None], logits, -jnp.inf)
      has_key = jnp.any(full_mask, axis=-1)[:, None, :, None]
      logits = jnp.where(has_key, logits, 0.0)
    probs = jax.nn.softmax(logits, axis=-1)
    if full_mask is not None:
      probs = jnp.where(has_key, probs, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), value)


class Mlp(nn.Module):
  """Position-wise MLP (gelu by default): embed -> mlp -> embed."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"  # key of ACTIVATIONS
  lora: LoRA | None = None  # low-rank adapters of fc1 and fc2

  @nn.compact
  def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    h = dense(self.hidden, (EMBED, MLP), name="fc1", **kw)(x)
    h = ACTIVATIONS[self.act](h)
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP))
    return dense(x.shape[-1], (MLP, EMBED), name="fc2", **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # MultiHeadAttention kernel
  style: Style = Style()
  lora: LoRA | None = None  # low-rank adapters of the attention and MLP kernels

  @nn.compact
  def __call__(self, x: Float[Array, "b n d"], mask: Bool[Array, "..."] | None = None) -> Float[Array, "b n d"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(name="ln_attn", style=self.style, **kw)(x)
    x = x + MultiHeadAttention(self.num_heads, kernel=self.attention, lora=self.lora, name="attn", **kw)(h, mask=mask)
    x = nn.with_logical_constraint(x, TOKENS)
    h = layer_norm(name="ln_mlp", style=self.style, **kw)(x)
    x = x + Mlp(self.mlp_dim, name="mlp", act=self.style.act, lora=self.lora, **kw)(h)
    return nn.with_logical_constraint(x, TOKENS)


class Transformer(nn.Module):
  """A stack of `depth` pre-LN blocks and a final LayerNorm."""

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # MultiHeadAttention kernel
  style: Style = Style()
  lora: LoRA | None = None  # low-rank adapters of every block's attention and MLP kernels

  @nn.compact
  def __call__(self, x: Float[Array, "b n d"], mask: Bool[Array, "..."] | None = None) -> Float[Array, "b n d"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(x.astype(self.dtype), TOKENS)
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_dim, attention=self.attention, style=self.style, lora=self.lora,
                           name=f"block_{i}", **kw)(x, mask)
    return layer_norm(name="ln_final", style=self.style, **kw)(x)
