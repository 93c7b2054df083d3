"""One encoder per modality; each maps raw inputs to (tokens f32[B, N, width], token_mask bool[B, N])."""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from crucible_jax.common_types import EMBED, LENGTH, PATCH, VOCAB
from crucible_jax.models.layers import (TOKENS, Dtype, Style, Transformer, default_kernel_init, dense, layer_norm,
                                        logical)
from crucible_jax.models.lora import LoRA
from crucible_jax.models.melspec import AudioAugment, log_mel_spectrogram, perturb_waveform, spec_augment_keep

Encoded = tuple[Float[Array, "b n d"], Bool[Array, "b n"]]
NORM_EPS = 1e-5
TEXT_MASKS: tuple[str, ...] = ("padding", "causal", "none")  # text.mask: id-0 keys hidden | causal (CLIP) | none


class PositionalTransformer(nn.Module):
  """Adds a learned positional embedding of `max_len` rows to embedded tokens ([+ LayerNorm]), then a Transformer."""

  max_len: int
  depth: int
  num_heads: int
  mlp_dim: int
  pos_std: float = 0.02  # init std of the positional embedding, relative to unit-scale token features
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # attention kernel (layers.ATTENTION_KERNELS)
  style: Style = Style()
  pre_norm: bool = False  # a LayerNorm before the first block (CLIP's ln_pre)
  lora: LoRA | None = None  # low-rank adapters of the blocks' attention and MLP kernels

  @nn.compact
  def __call__(self, x: Float[Array, "b n d"], mask: Bool[Array, "..."] | None) -> Float[Array, "b n d"]:
    length, width = x.shape[1:]
    if length > self.max_len:
      raise ValueError(f"sequence of {length} tokens exceeds max_len={self.max_len}")
    pos = self.param(
        "pos_embedding",
        logical(nn.initializers.normal(self.pos_std), (LENGTH, EMBED)),
        (self.max_len, width),
        self.param_dtype,
    )
    x = x + jnp.asarray(pos[:length], self.dtype)[None]
    if self.pre_norm:
      x = layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, style=self.style, name="ln_pre")(x)
    return Transformer(
        self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        attention=self.attention, style=self.style, lora=self.lora, name="transformer",
    )(x, mask)


class ConvStem(nn.Module):
  """Per stage `convs_per_stage` 3x3 convs (each with gelu) and a 2x2 max-pool over [N, H, W, C]: the locality and
  shift tolerance a small ViT lacks.

  "Early convolutions help transformers see better" (Xiao et al., 2021): a plain patch-embedding ViT barely learns to
  read jittered handwriting in the few hundred steps of the default run (BUILD_NOTES). Each stage halves height and
  width (floor), so patch sizes apply to the pooled grid.
  """

  features: tuple[int, ...]
  convs_per_stage: int = 1  # 3x3 conv + gelu layers before each pool; stage i's are conv_i, conv_i_1, ...
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "n h w c"]) -> Float[Array, "n h w f"]:
    x = x.astype(self.dtype)
    for i, features in enumerate(self.features):
      for j in range(self.convs_per_stage):
        x = nn.gelu(nn.Conv(
            features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(default_kernel_init, (None, None, None, PATCH)),
            bias_init=logical(nn.initializers.zeros_init(), (PATCH,)), name=f"conv_{i}" + (f"_{j}" if j else ""),
        )(x))
      x = max_pool_2x2(x)
    return x


def max_pool_2x2(x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 c"]:
  """2x2 max-pool, stride 2 (odd edges dropped) as a reshape and a max: equal to `nn.max_pool`, 4-10x faster backward.

  `nn.max_pool` is a reduce-window whose gradient JAX builds from iotas and a select-and-gather over the window;
  on XLA:CPU that made the stems' backward pass ~15% of the DigitWorld joint step (BUILD_NOTES, session 10). A max
  over reshaped axes differentiates as a plain reduction (ties share the gradient instead of going to the first).
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class _Tower(nn.Module):
  """Fields shared by every encoder: an optional conv stem and a Transformer tower of `width` x `depth`."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  stem: tuple[int, ...] = ()  # conv stem channels per stage (3x3 conv + 2x2 max-pool); () = plain ViT patches
  stem_convs: int = 1  # 3x3 convs per stem stage
  pos_std: float = 0.02  # init std of the learned positional embedding
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # attention kernel (layers.ATTENTION_KERNELS)
  style: Style = Style()  # MLP activation and LayerNorm numerics
  pre_norm: bool = False  # LayerNorm after the positional embedding (CLIP's ln_pre)
  cls_token: bool = False  # prepend a learned class token (CLIP); its output is token 0
  patch_bias: bool = True  # bias of the patch embedding (CLIP's conv1 has none)
  lora: LoRA | None = None  # low-rank adapters of the Transformer's attention and MLP kernels

  def apply_stem(self, x: Float[Array, "n h w c"]) -> Float[Array, "n h w f"]:
    """The conv stem over 2-D inputs (identity without one)."""
    if not self.stem:
      return x
    return ConvStem(self.stem, self.stem_convs, dtype=self.dtype, param_dtype=self.param_dtype, name="stem")(x)

  def encode_patches(self, patches: Float[Array, "b n p"], mask: Bool[Array, "b n"]) -> Encoded:
    """Project flat patches to `width` ([, prepend the class token]) and run the positional Transformer."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.width, (PATCH, EMBED), name="patch_embed", use_bias=self.patch_bias, **kw)(
        patches.astype(self.dtype))
    if self.cls_token:
      cls = self.param("cls_token", logical(nn.initializers.normal(self.pos_std), (EMBED,)), (self.width,),
                       self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], axis=1)
      mask = jnp.concatenate([jnp.ones((mask.shape[0], 1), bool), mask], axis=1)
    x = nn.with_logical_constraint(x, TOKENS)
    return PositionalTransformer(
        x.shape[1], self.depth, self.num_heads, self.mlp_dim, self.pos_std, attention=self.attention,
        style=self.style, pre_norm=self.pre_norm, lora=self.lora, name="encoder", **kw
    )(x, mask), mask


class ImageEncoder(_Tower):
  """ViT: non-overlapping (ph, pw) patches of [B, H, W, C] images, row-major; no CLS token."""

  patch: tuple[int, int] = (4, 4)

  @nn.compact
  def __call__(self, images: Float[Array, "b h w c"]) -> Encoded:
    ph, pw = self.patch
    if images.ndim != 4:
      raise ValueError(f"image batch {images.shape} is not [B, H, W, C]")
    images = self.apply_stem(images)
    if images.shape[1] % ph or images.shape[2] % pw:
      raise ValueError(f"image grid {images.shape[1:3]} (after a {len(self.stem)}-stage stem) is not divisible by "
                       f"patch {self.patch}")
    patches = einops.rearrange(images, "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=ph, pw=pw)
    return self.encode_patches(patches, jnp.ones(patches.shape[:2], bool))


class VideoEncoder(_Tower):
  """Tubelets of (t, ph, pw) over [B, F, H, W, C] clips, ordered time-major."""

  tubelet: tuple[int, int, int] = (2, 4, 4)

  @nn.compact
  def __call__(self, video: Float[Array, "b f h w c"]) -> Encoded:
    t, ph, pw = self.tubelet
    if video.ndim != 5:
      raise ValueError(f"video batch {video.shape} is not [B, F, H, W, C]")
    frames = self.apply_stem(einops.rearrange(video, "b f h w c -> (b f) h w c"))
    video = einops.rearrange(frames, "(b f) h w c -> b f h w c", b=video.shape[0])
    if video.shape[1] % t or video.shape[2] % ph or video.shape[3] % pw:
      raise ValueError(f"video grid {video.shape[1:4]} (after a {len(self.stem)}-stage stem) is not divisible by "
                       f"tubelet {self.tubelet}")
    patches = einops.rearrange(
        video, "b (f t) (h ph) (w pw) c -> b (f h w) (t ph pw c)", t=t, ph=ph, pw=pw
    )
    return self.encode_patches(patches, jnp.ones(patches.shape[:2], bool))


def normalize_per_utterance(
    log_mel: Float[Array, "b f m"], frame_mask: Bool[Array, "b f"]
) -> Float[Array, "b f m"]:
  """Mean/variance normalise each mel bin over an utterance's valid frames; invalid frames become 0."""
  weights = frame_mask[..., None].astype(jnp.float32)
  count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
  mean = (log_mel * weights).sum(axis=1, keepdims=True) / count
  var = (jnp.square(log_mel - mean) * weights).sum(axis=1, keepdims=True) / count
  return (log_mel - mean) * jnp.sqrt(1.0 / (var + NORM_EPS)) * weights


class AudioEncoder(_Tower):
  """Waveform -> normalised log-mel -> one token per `patch_frames` frames (time-ordered, for CTC)."""

  sample_rate: int = 8000
  n_fft: int = 512
  hop: int = 160
  n_mels: int = 32
  patch_frames: int = 4
  augment: AudioAugment | None = None  # train-time waveform and SpecAugment perturbation; None = off

  def features(
      self, wave: Float[Array, "b t"], lengths: Int[Array, " b"], train: bool = False
  ) -> tuple[Float[Array, "b n p"], Bool[Array, "b n"]]:
    """Flat log-mel patches and their mask; a token is valid when its first frame is. Augmented iff `train`."""
    augmenting = train and self.augment is not None
    if augmenting:
      if not self.has_rng("dropout"):
        raise ValueError("audio augmentation in training needs the 'dropout' rng")
      wave_rng, mask_rng = jax.random.split(self.make_rng("dropout"))
      wave, lengths = perturb_waveform(wave_rng, wave, lengths, self.augment)
    log_mel, frame_mask = log_mel_spectrogram(
        wave, lengths, sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels
    )
    log_mel = normalize_per_utterance(log_mel, frame_mask)
    if augmenting:  # after normalising, a masked bin reads as the utterance's mean
      log_mel = jnp.where(spec_augment_keep(mask_rng, frame_mask, self.n_mels, self.augment), log_mel, 0.0)
    if self.stem:  # the spectrogram as a one-channel (time x mel) image; a pooled frame is valid if its first is
      log_mel = einops.rearrange(self.apply_stem(log_mel[..., None]), "b f m c -> b f (m c)")
      frame_mask = frame_mask[:, :: 2 ** len(self.stem)][:, : log_mel.shape[1]]
    tokens = log_mel.shape[1] // self.patch_frames
    if tokens == 0:
      raise ValueError(f"audio of {wave.shape[1]} samples is shorter than one patch of {self.patch_frames} frames")
    usable = tokens * self.patch_frames
    patches = einops.rearrange(log_mel[:, :usable], "b (n p) m -> b n (p m)", p=self.patch_frames)
    return patches, frame_mask[:, :usable:self.patch_frames]

  @nn.compact
  def __call__(self, wave: Float[Array, "b t"], lengths: Int[Array, " b"], train: bool = False) -> Encoded:
    return self.encode_patches(*self.features(wave, lengths, train))


class TextEncoder(nn.Module):
  """Token embedding + learned positions -> Transformer; `mask` says which keys each token sees (TEXT_MASKS).

  "padding" hides id-0 keys and returns them as invalid tokens; "causal" (CLIP) and "none" (SigLIP) treat every
  position as valid, as the reference models do (CLIP's id 0 is a real token, "!").
  """

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pos_std: float = 0.02  # init std of the learned positional embedding
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # attention kernel (layers.ATTENTION_KERNELS)
  style: Style = Style()  # MLP activation and LayerNorm numerics
  mask: str = "padding"  # one of TEXT_MASKS
  lora: LoRA | None = None  # low-rank adapters of the Transformer's attention and MLP kernels

  @nn.compact
  def __call__(self, tokens: Int[Array, "b l"]) -> Encoded:
    if tokens.ndim != 2:
      raise ValueError(f"text tokens must be [B, L], got shape {tokens.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = tokens != 0 if self.mask == "padding" else jnp.ones(tokens.shape, bool)
    keys = mask
    if self.mask == "causal":
      length = tokens.shape[1]
      keys = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (tokens.shape[0], length, length))
    elif self.mask == "none":
      keys = None
    x = nn.Embed(
        self.vocab_size,
        self.width,
        embedding_init=logical(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        name="token_embed",
        **kw,
    )(tokens)
    x = nn.with_logical_constraint(x, TOKENS)
    x = PositionalTransformer(self.max_len, self.depth, self.num_heads, self.mlp_dim, self.pos_std,
                              attention=self.attention, style=self.style, lora=self.lora, name="encoder", **kw)(x, keys)
    return x, mask
