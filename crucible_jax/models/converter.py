"""Cross-modal generation from the shared space: a captioning TextDecoder (KV cache) and an ImageDecoder.

The text decoder writes a sample's caption (the batch's `caption`, byte tokens + EOS, which the data source renders)
from any source modality's encoder tokens plus its shared embedding (CoCa style: causal self-attention,
cross-attention to the source). The image decoder maps a shared embedding (any modality's `projections[m]` output)
to an image of `model.image.size`.
The model's `caption`/`imagine` heads call `converter_outputs`; `generate_caption`/`generate_image` are the
`model.apply(..., method=...)` entry points of `crucible generate`.
"""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jaxtyping import Array, Bool, Float, Int

from crucible_jax.common_types import EMBED, JOINT, LENGTH, MLP, MODALITIES, VOCAB
from crucible_jax.data.tokenizers import byte
from crucible_jax.models import decoding
from crucible_jax.models.layers import (
    Dtype, HeadMerge, HeadProjection, Mlp, MultiHeadAttention, TOKENS, default_kernel_init, dense, layer_norm, logical,
)

CONVERTER_HEADS = ("caption", "imagine")
IMAGE_TARGETS = ("sample", "reference")
IMAGE_UPSAMPLING = 4  # the image decoder's coarse grid is image.size / 4 (two stride-2 transposed convs)


def default_converter_config() -> ml_collections.ConfigDict:
  """Off by default: param trees and heads are unchanged unless `enabled`."""
  cfg = ml_collections.ConfigDict()
  cfg.enabled = False  # build the text/image decoders and the "caption"/"imagine" heads
  cfg.caption_sources = ("image", "video", "audio")  # modalities the text decoder captions (teacher-forced in train)
  cfg.image_sources = ("image", "text", "audio", "video")  # modalities whose shared embedding the image decoder reads
  cfg.width, cfg.depth, cfg.heads, cfg.mlp = 64, 2, 4, 128  # text decoder features, blocks, heads, MLP features
  cfg.max_len = 24  # caption length incl. EOS, tokens (>= data.caption_len)
  cfg.image_width = 64  # image decoder channels on the coarse grid (features)
  cfg.image_target = "sample"  # imagine/<m> target: "sample" (its own image) or "reference" (the source's drawing)
  cfg.beam_size = 1  # eval-time caption decoding: 1 = greedy, k > 1 = beam search of width k
  cfg.length_alpha = 0.0  # beam search length normalisation: score / length**alpha (0 = raw log-probability)
  return cfg


@dataclasses.dataclass(frozen=True)
class ConverterSpec:
  """Validated, hashable converter settings."""

  caption_sources: tuple[str, ...]
  image_sources: tuple[str, ...]
  width: int
  depth: int
  heads: int
  mlp: int
  max_len: int
  image_width: int
  image_size: tuple[int, int]  # (height, width) of generated images, pixels
  image_channels: int
  beam_size: int
  length_alpha: float


def converter_spec(cfg: ml_collections.ConfigDict | None, modalities: tuple[str, ...], image_size: tuple[int, int],
                   image_channels: int) -> ConverterSpec | None:
  """The spec of `model.converter`, None when absent or disabled; ValueError naming the bad field."""
  if cfg is None or not cfg.get("enabled", False):
    return None
  for field in ("caption_sources", "image_sources"):
    bad = [m for m in cfg[field] if m not in modalities]
    if bad:
      raise ValueError(f"converter.{field} has {bad}, not among the active modalities {modalities}")
  bad = [m for m in cfg.caption_sources if m not in MODALITIES or m == "text"]
  if bad:
    raise ValueError(f"converter.caption_sources: cannot caption {bad} (text is the decoder's output)")
  ints = {k: cfg[k] for k in ("width", "depth", "heads", "mlp", "max_len", "image_width", "beam_size")}
  for key, value in ints.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"converter.{key}={value!r} must be a positive integer")
  if cfg.width % cfg.heads:
    raise ValueError(f"converter.width={cfg.width} is not divisible by converter.heads={cfg.heads}")
  if cfg.get("image_target", "sample") not in IMAGE_TARGETS:
    raise ValueError(f"converter.image_target={cfg.image_target!r} is not one of {IMAGE_TARGETS}")
  if any(s % IMAGE_UPSAMPLING for s in image_size):
    raise ValueError(f"image.size={tuple(image_size)} must be divisible by {IMAGE_UPSAMPLING} for the image decoder")
  return ConverterSpec(tuple(cfg.caption_sources), tuple(cfg.image_sources), cfg.width, cfg.depth, cfg.heads,
                       cfg.mlp, cfg.max_len, cfg.image_width, tuple(image_size), int(image_channels), cfg.beam_size,
                       float(cfg.length_alpha))


# --- caption targets ---------------------------------------------------------------------------------------------

def caption_targets(batch: Mapping[str, Array], max_len: int) -> tuple[Int[Array, "b l"], Bool[Array, "b l"]]:
  """(targets, valid-target mask) [B, max_len]: the batch's `caption` (tokens + EOS, 0 = padding) padded to max_len."""
  if "caption" not in batch:
    raise ValueError("the caption head learns batch['caption'], which this batch lacks: the data source renders it "
                     "when data.caption_len > 0")
  caption = jnp.asarray(batch["caption"], jnp.int32)
  if caption.shape[1] > max_len:
    raise ValueError(f"batch['caption'] has {caption.shape[1]} tokens, more than model.converter.max_len={max_len}")
  targets = jnp.pad(caption, ((0, 0), (0, max_len - caption.shape[1])))
  return targets, targets != byte.PAD


def teacher_inputs(targets: Int[Array, "b l"]) -> Int[Array, "b l"]:
  """Decoder inputs of teacher forcing: BOS, then the targets shifted right by one."""
  return jnp.concatenate([jnp.full((targets.shape[0], 1), byte.BOS, jnp.int32), targets[:, :-1]], axis=1)


# --- modules -----------------------------------------------------------------------------------------------------

class CachedSelfAttention(nn.Module):
  """Causal self-attention; with `index`, x is one step at that position and K/V live in the 'cache' collection."""

  num_heads: int
  max_len: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t d"], index: Int[Array, ""] | None = None) -> Float[Array, "b t d"]:
    batch, steps, width = x.shape
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query, key, value = HeadProjection(self.num_heads, head_dim, count=3, name="qkv", **kw)(x)
    query_pos = jnp.arange(steps)
    if index is not None:
      shape = (batch, self.max_len, self.num_heads, head_dim)
      cached_key = self.variable("cache", "key", jnp.zeros, shape, key.dtype)
      cached_value = self.variable("cache", "value", jnp.zeros, shape, value.dtype)
      start = (0, index, 0, 0)
      key = cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
      value = cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
      query_pos = query_pos + index
    causal = jnp.arange(key.shape[1])[None, :] <= query_pos[:, None]  # [t, k]; unwritten cache slots are future
    query = query * jnp.asarray(head_dim**-0.5, self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(causal[None, None], logits, -jnp.inf), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), value)
    return HeadMerge(width, name="out", **kw)(attended)


class TextDecoder(nn.Module):
  """Autoregressive byte-level caption decoder over one source modality's tokens and shared embedding."""

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  sources: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Int[Array, "b t"], source_tokens: Float[Array, "b n c"], source_mask: Bool[Array, "b n"],
               embedding: Float[Array, "b j"], source: str, index: Int[Array, ""] | None = None
               ) -> Float[Array, "b t v"]:
    """Logits for the next token at each position; `index` = decode one step there using the KV cache."""
    if source not in self.sources:
      raise ValueError(f"text decoder has no memory projection for source {source!r}; sources {self.sources}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Memory: the shared embedding as one token, then the source's encoder tokens, both in the decoder's width.
    memory = jnp.concatenate([dense(self.width, (JOINT, EMBED), name=f"embedding_{source}", **kw)(embedding)[:, None],
                              dense(self.width, (EMBED, MLP), name=f"memory_{source}", **kw)(source_tokens)], axis=1)
    memory = layer_norm(name="ln_memory", **kw)(memory)
    memory_mask = jnp.concatenate([jnp.ones_like(source_mask[:, :1]), source_mask], axis=1)
    embed = self.param("token_embedding", logical(nn.initializers.normal(0.02), (VOCAB, EMBED)),
                       (self.vocab_size, self.width), self.param_dtype)
    pos_embed = self.param("position_embedding", logical(nn.initializers.normal(0.02), (LENGTH, EMBED)),
                           (self.max_len, self.width), self.param_dtype)
    steps = tokens.shape[1]
    positions = jnp.arange(steps) if index is None else index + jnp.arange(steps)
    x = (embed[tokens] + pos_embed[positions][None]).astype(self.dtype)
    x = nn.with_logical_constraint(x, TOKENS)
    for i in range(self.depth):
      h = layer_norm(name=f"ln_self_{i}", **kw)(x)
      x = x + CachedSelfAttention(self.num_heads, self.max_len, name=f"self_attn_{i}", **kw)(h, index)
      h = layer_norm(name=f"ln_cross_{i}", **kw)(x)
      x = x + MultiHeadAttention(self.num_heads, name=f"cross_attn_{i}", **kw)(h, memory, mask=memory_mask)
      h = layer_norm(name=f"ln_mlp_{i}", **kw)(x)
      x = nn.with_logical_constraint(x + Mlp(self.mlp_dim, name=f"mlp_{i}", **kw)(h), TOKENS)
    x = layer_norm(name="ln_final", **kw)(x)
    return dense(self.vocab_size, (EMBED, VOCAB), name="logits", **kw)(x).astype(jnp.float32)


class ImageDecoder(nn.Module):
  """Shared embedding -> MLP -> coarse grid (size/4) -> two stride-2 transposed convs -> image in [0, 1]."""

  image_size: tuple[int, int]
  channels: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embedding: Float[Array, "b j"]) -> Float[Array, "b h w c"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    height, width = (s // IMAGE_UPSAMPLING for s in self.image_size)
    # A unit-norm embedding has components ~1/sqrt(J); rescaled to unit variance, fc1 starts at a useful scale.
    embedding = embedding * math.sqrt(embedding.shape[-1])  # a Python float: keeps the embedding's dtype
    x = nn.gelu(dense(4 * self.width, (JOINT, MLP), name="fc1", **kw)(embedding))
    x = dense(height * width * self.width, (MLP, EMBED), name="fc2", **kw)(x)
    x = layer_norm(name="ln_grid", **kw)(x.reshape(-1, height, width, self.width))

    def conv(cls, features: int, kernel: int, stride: int, name: str) -> nn.Module:
      return cls(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name,
                 kernel_init=logical(default_kernel_init, (None, None, EMBED, MLP)),
                 bias_init=logical(nn.initializers.zeros_init(), (MLP,)), **kw)

    x = nn.gelu(conv(nn.ConvTranspose, self.width, 4, 2, "up1")(x))
    x = nn.gelu(conv(nn.ConvTranspose, self.width // 2, 4, 2, "up2")(x))
    x = conv(nn.Conv, self.channels, 3, 1, "to_pixels")(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


def make_decoders(spec: ConverterSpec, dtype: Dtype, param_dtype: Dtype) -> tuple[TextDecoder, ImageDecoder]:
  """The two decoders of a spec, built in CrucibleModel.setup; captions are byte-tokenizer ids."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  text = TextDecoder(byte.VOCAB_SIZE, spec.max_len, spec.width, spec.depth, spec.heads, spec.mlp,
                     spec.caption_sources, **kw)
  return text, ImageDecoder(spec.image_size, spec.image_channels, spec.image_width, **kw)


# --- the model's heads and generation entry points ---------------------------------------------------------------

def _decode_captions(model: Any, source: str, encoded: tuple[Array, Array], embedding: Array, beam_size: int,
                     length_alpha: float) -> Int[Array, "b l"]:
  """Caption token ids [B, max_len] (EOS then PAD) decoded from one source with the KV cache, greedy or beam."""
  spec = model.config.converter
  tokens, mask = encoded
  batch = tokens.shape[0]
  decoder = model.caption_decoder
  if model.is_initializing():  # create the decoder's params before reading them
    decoder(jnp.full((batch, 1), byte.BOS, jnp.int32), tokens, mask, embedding, source=source)
  params = nn.meta.unbox(decoder.variables["params"])
  unbound = decoder.clone(parent=None, name=None)
  repeat = lambda x: jnp.repeat(x, beam_size, axis=0)
  memory = (repeat(tokens), repeat(mask), repeat(embedding))

  def step(last: Array, cache: Any, index: Array) -> tuple[Array, Any]:
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, state = unbound.apply(variables, last[:, None], *memory, source=source, index=index, mutable=["cache"])
    return logits[:, 0], state["cache"]

  shapes = jax.eval_shape(step, jnp.zeros((batch * beam_size,), jnp.int32), None, jnp.zeros((), jnp.int32))[1]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if beam_size == 1:
    return decoding.greedy_decode(step, cache, batch, spec.max_len)
  return decoding.beam_search(step, cache, batch, beam_size, spec.max_len, length_alpha=length_alpha)[0]


def converter_outputs(model: Any, batch: Mapping[str, Array], encoded: Mapping[str, tuple[Array, Array]],
                      pooled: Mapping[str, Array], heads: tuple[str, ...], train: bool) -> dict[str, Any]:
  """The `caption` head (train: teacher-forced logits; eval: decoded ids) and the `imagine` head (images)."""
  spec: ConverterSpec = model.config.converter
  out: dict[str, Any] = {}
  embeddings = {m: model.projections[m](pooled[m]) for m in set(spec.caption_sources) | set(spec.image_sources)}
  if "caption" in heads:
    if train:
      inputs = teacher_inputs(caption_targets(batch, spec.max_len)[0])
      out["caption_logits"] = {m: model.caption_decoder(inputs, *encoded[m], embeddings[m], source=m)
                               for m in spec.caption_sources}
    else:
      out["caption_ids"] = {m: _decode_captions(model, m, encoded[m], embeddings[m], spec.beam_size,
                                                spec.length_alpha) for m in spec.caption_sources}
  if "imagine" in heads:
    out["images"] = {m: model.image_decoder(embeddings[m]) for m in spec.image_sources}
  return out


def generate_caption(model: Any, batch: Mapping[str, Array], source: str, beam_size: int = 1,
                     length_alpha: float = 0.0) -> Int[Array, "b l"]:
  """`model.apply(variables, batch, source, method=generate_caption)`: caption ids from one modality."""
  if model.config.converter is None or source not in model.config.converter.caption_sources:
    raise ValueError(f"the model cannot caption {source!r}: converter.caption_sources="
                     f"{getattr(model.config.converter, 'caption_sources', ())}")
  encoded = model.encode(batch, modalities=(source,))[source]
  embedding = model.projections[source](model.pools[source](*encoded).reshape(encoded[0].shape[0], -1))
  return _decode_captions(model, source, encoded, embedding, beam_size, length_alpha)


def generate_image(model: Any, batch: Mapping[str, Array], source: str) -> Float[Array, "b h w c"]:
  """`model.apply(variables, batch, source, method=generate_image)`: images from one modality's embedding."""
  if model.config.converter is None or source not in model.config.converter.image_sources:
    raise ValueError(f"the model cannot draw from {source!r}: converter.image_sources="
                     f"{getattr(model.config.converter, 'image_sources', ())}")
  encoded = model.encode(batch, modalities=(source,))[source]
  embedding = model.projections[source](model.pools[source](*encoded).reshape(encoded[0].shape[0], -1))
  return model.image_decoder(embedding)
