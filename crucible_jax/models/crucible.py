"""The assembled multimodal model: per-modality encoders, the shared embedding space, fusion and task heads."""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from crucible_jax.common_types import AUDIO, IMAGE, TEXT, VIDEO, present_key
from crucible_jax.models import balance as balance_lib
from crucible_jax.models import converter as converter_lib
from crucible_jax.models import encoders as enc
from crucible_jax.models.cross_attention import BidirectionalFusionBlock
from crucible_jax.models.fusion import AdaptiveFusion
from crucible_jax.models.heads import (ClassifierHead, JointProjection, QueryPool, SlotAnswerHead, TokenPool,
                                       masked_mean_pool, position_targets)
from crucible_jax.models.layers import Dtype, Style, logical
from crucible_jax.models.lora import LoRA
from crucible_jax.models.melspec import AudioAugment
from crucible_jax.models.router import RoutePlan, RoutingSpec, routed_encode

# The model's heads, in a fixed order (tasks/ registers what trains and scores each). `position` heads classify
# `max_digits` label positions per modality (`pretrain`) or fused (`fused`); `asr` is a per-frame CTC head.
ALL_HEADS: tuple[str, ...] = ("embed", "pretrain", "vqa", "tagging", "asr", "fused", *converter_lib.CONVERTER_HEADS)
HEAD_MODALITIES: dict[str, tuple[str, ...]] = {"vqa": (IMAGE, TEXT), "tagging": (AUDIO,), "asr": (AUDIO,)}  # else: any
HEAD_INPUTS: dict[str, tuple[str, ...]] = {"vqa": (IMAGE,), "tagging": (AUDIO,), "asr": (AUDIO,)}  # encoded; else all
VQA_READERS: tuple[str, ...] = ("concat", "slots")  # model.heads.vqa_reader: how the answer head reads the image slots
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LOGIT_SCALE_INIT = math.log(10.0)  # contrastive temperature, as log(scale)
LOGIT_BIAS_INIT = -10.0  # SigLIP's sigmoid bias


@dataclasses.dataclass(frozen=True)
class TowerSpec:
  """Size and compute dtype of one modality's Transformer encoder."""

  width: int
  depth: int
  heads: int
  mlp: int
  dtype: Dtype
  stem: tuple[int, ...] = ()  # conv stem channels (image, video, audio); () = linear patch embedding
  stem_convs: int = 1  # 3x3 convs per stem stage
  pos_std: float = 0.02  # init std of the learned positional embedding
  attention: str = "xla"  # attention kernel of the tower's blocks (layers.ATTENTION_KERNELS)
  style: Style = Style()  # MLP activation and LayerNorm numerics
  pre_norm: bool = False  # LayerNorm after the positional embedding (CLIP's ln_pre)
  cls_token: bool = False  # a learned class token before the patches (image, video, audio)
  patch_bias: bool = True  # bias of the patch embedding
  pool: str = "slots"  # how tokens become the projected vector (heads.POOLS)
  proj_bias: bool = True  # bias of the projection into the joint space
  text_mask: str = "padding"  # attention mask of the text tower (encoders.TEXT_MASKS)
  lora: LoRA | None = None  # low-rank adapters of the tower's attention and MLP kernels (models.lora)


@dataclasses.dataclass(frozen=True)
class FusionSpec:
  """VQA cross-modal fusion and AdaptiveFusion settings."""

  cross_attention: bool
  gated: bool
  cross_depth: int
  dtype: Dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable, validated model settings; `build_model` makes it from the ConfigDict."""

  modalities: tuple[str, ...]  # active modalities in MODALITIES order
  towers: tuple[tuple[str, TowerSpec], ...]  # (modality, spec) for each active modality
  image_patch: tuple[int, int]  # (height, width) pixels per ViT patch
  video_tubelet: tuple[int, int, int]  # (frames, height, width) per video token
  audio_frontend: tuple[tuple[str, int], ...]  # sample_rate, n_fft, hop, n_mels, patch_frames
  text_vocab: tuple[int, int]  # (vocab_size, max_len)
  fusion: FusionSpec
  joint_dim: int  # width of the shared embedding space
  max_digits: int  # label positions predicted by the pretrain and fused heads
  num_labels: int  # label classes of the position heads (each adds an end class) and the CTC head (adds the blank)
  num_answers: int  # VQA answer classes
  vqa_hidden: int  # hidden units of the VQA answer head's residual MLP
  vqa_reader: str  # answer head input: "concat" (question + flattened image slots) | "slots" (SlotAnswerHead)
  num_tags: int  # audio tagging labels
  dtype: Dtype  # compute dtype of the heads
  param_dtype: Dtype
  routing: RoutingSpec | None = None  # dynamic modality routing; None = every present modality is encoded
  balance: balance_lib.BalanceSpec = balance_lib.BalanceSpec()  # gradient balancing before fusion (OGM-GE)
  converter: converter_lib.ConverterSpec | None = None  # caption/image decoders (cross-modal generation); None = off
  heads: tuple[str, ...] | None = None  # heads this model has (a converted CLIP: ("embed",)); None = ALL_HEADS
  audio_augment: AudioAugment | None = None  # train-time audio augmentation; None = off

  def tower(self, modality: str) -> TowerSpec:
    """The encoder spec of an active modality."""
    return dict(self.towers)[modality]


def _require(batch: Mapping[str, Array], key: str) -> Array:
  """batch[key], or a ValueError naming the missing key."""
  if key not in batch:
    raise ValueError(f"batch lacks key {key!r} (has {sorted(batch)})")
  return batch[key]


class CrucibleModel(nn.Module):
  """Encoders for the active modalities, a shared embedding space and the task heads of ALL_HEADS."""

  config: ModelConfig

  def setup(self) -> None:
    c = self.config
    head_kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.encoders = {m: self._make_encoder(m) for m in c.modalities}
    self.projections = {m: JointProjection(c.joint_dim, use_bias=c.tower(m).proj_bias, **head_kw)
                        for m in c.modalities}
    self.token_pools = {m: TokenPool(c.tower(m).pool, c.tower(m).heads, c.tower(m).mlp, c.tower(m).style, **head_kw)
                        for m in c.modalities if c.tower(m).pool != "slots"}
    # One slot per digit position plus a summary slot: order-aware read-out of each modality's tokens.
    self.pools = {m: QueryPool(c.max_digits + 1, c.tower(m).heads, **head_kw) for m in c.modalities}
    self.pretrain_heads = {m: ClassifierHead(c.num_labels + 1, **head_kw) for m in c.modalities}
    scalar = lambda value: logical(nn.initializers.constant(value), ())
    self.logit_scale = self.param("logit_scale", scalar(LOGIT_SCALE_INIT), (), jnp.float32)
    self.logit_bias = self.param("logit_bias", scalar(LOGIT_BIAS_INIT), (), jnp.float32)
    if "vqa" in self.available_heads and c.fusion.cross_attention:
      image, text = c.tower(IMAGE), c.tower(TEXT)
      self.vqa_blocks = [
          BidirectionalFusionBlock(
              text.heads, text.mlp, image.heads, image.mlp, gated=c.fusion.gated,
              dtype=c.fusion.dtype, param_dtype=c.param_dtype,
          )
          for _ in range(c.fusion.cross_depth)
      ]
    if "vqa" in self.available_heads:
      self.vqa_head = (SlotAnswerHead(c.num_answers, c.vqa_hidden, **head_kw) if c.vqa_reader == "slots"
                       else ClassifierHead(c.num_answers, hidden=c.vqa_hidden, **head_kw))
    if AUDIO in c.modalities:
      self.tag_head = ClassifierHead(c.num_tags, **head_kw)
      self.ctc_head = ClassifierHead(c.num_labels + 1, **head_kw)
    self.fusion = AdaptiveFusion(c.modalities, dtype=c.fusion.dtype, param_dtype=c.param_dtype)
    self.fused_head = ClassifierHead(c.max_digits * (c.num_labels + 1), **head_kw)
    if c.routing is not None:
      self.router = c.routing.router()
    if c.converter is not None:
      self.caption_decoder, self.image_decoder = converter_lib.make_decoders(c.converter, c.dtype, c.param_dtype)

  @property
  def available_heads(self) -> tuple[str, ...]:
    """Heads whose modalities are all active (and that `heads` enables); other heads are skipped silently."""
    active = set(self.config.modalities)
    generation = self.config.converter is not None
    enabled = ALL_HEADS if self.config.heads is None else self.config.heads
    return tuple(h for h in ALL_HEADS if set(HEAD_MODALITIES.get(h, ())) <= active and h in enabled
                 and (generation or h not in converter_lib.CONVERTER_HEADS))

  def _make_encoder(self, modality: str) -> nn.Module:
    c, spec = self.config, self.config.tower(modality)
    kw = dict(
        width=spec.width, depth=spec.depth, num_heads=spec.heads, mlp_dim=spec.mlp,
        pos_std=spec.pos_std, dtype=spec.dtype, param_dtype=c.param_dtype, attention=spec.attention,
        style=spec.style, lora=spec.lora,
    )
    if modality != TEXT:
      kw.update(stem=spec.stem, stem_convs=spec.stem_convs, pre_norm=spec.pre_norm, cls_token=spec.cls_token,
                patch_bias=spec.patch_bias)
    if modality == IMAGE:
      return enc.ImageEncoder(patch=c.image_patch, **kw)
    if modality == VIDEO:
      return enc.VideoEncoder(tubelet=c.video_tubelet, **kw)
    if modality == AUDIO:
      return enc.AudioEncoder(**dict(c.audio_frontend), augment=c.audio_augment, **kw)
    vocab_size, max_len = c.text_vocab
    return enc.TextEncoder(vocab_size=vocab_size, max_len=max_len, mask=spec.text_mask, **kw)

  def encode(
      self, batch: Mapping[str, Array], train: bool = False, modalities: tuple[str, ...] | None = None,
      plan: RoutePlan | None = None, route: bool = True,
  ) -> dict[str, enc.Encoded]:
    """(tokens, token_mask) per modality (default: all active); the seam the modality router wraps.

    With routing on (and `route`), each encoder runs on its modality's static capacity only (`plan`, else the
    router is run here) and skipped samples come back fully masked, as do samples whose `<m>_present` is False.
    """
    if plan is None and route and self.config.routing is not None:
      plan, _ = self.router(batch, train=train)
    encoded = {}
    for m in self.config.modalities if modalities is None else modalities:
      if m not in self.encoders:
        raise ValueError(f"modality {m!r} is not active; cfg.modalities = {self.config.modalities}")
      if m == AUDIO:  # the audio tower augments in training
        inputs = (_require(batch, AUDIO), _require(batch, "audio_len"))
        encode_fn = lambda x: self.encoders[AUDIO](*x, train=train)
      else:
        inputs, encode_fn = _require(batch, m), self.encoders[m]
      tokens, mask = encode_fn(inputs) if plan is None else routed_encode(encode_fn, inputs, plan[m])
      if present_key(m) in batch:  # an absent modality's (zeroed) input is masked for every head, VQA included
        carried = jnp.asarray(batch[present_key(m)], bool)
        mask = mask & carried.reshape(carried.shape + (1,) * (mask.ndim - 1))
      encoded[m] = (tokens, mask)
    return encoded

  def answer(self, questions: Int[Array, "b l"], image: enc.Encoded) -> Float[Array, "b a"]:
    """VQA logits: question tokens (shared TextEncoder) fused with image tokens, or concatenated (ablation)."""
    question, question_mask = self.encoders[TEXT](questions)
    tokens, mask = image
    if self.config.fusion.cross_attention:
      for block in self.vqa_blocks:
        question, tokens = block(question, question_mask, tokens, mask)
    image_slots = self.pools[IMAGE](tokens, mask)
    question = masked_mean_pool(question, question_mask).astype(self.config.dtype)
    if self.config.vqa_reader == "slots":
      return self.vqa_head(question, image_slots.astype(self.config.dtype))
    return self.vqa_head(jnp.concatenate([question, image_slots.reshape(image_slots.shape[0], -1)], axis=-1))

  def __call__(
      self, batch: Mapping[str, Array], *, train: bool = False, heads: tuple[str, ...] = ALL_HEADS,
      route: bool = True,
  ) -> dict[str, Any]:
    """Outputs of the requested heads that the active modalities allow (see `available_heads`).

    `route=False` bypasses a configured router's plan (every present modality encoded, as with routing off): a
    stage that trains the encoders alone should not starve them of samples. Its estimator still scores every sample
    (`routing_aux`), so such a stage can teach it (`routing/utility`) with a target for every sample.
    """
    unknown = sorted(set(heads) - set(ALL_HEADS))
    if unknown:
      raise ValueError(f"unknown heads {unknown}; expected a subset of {ALL_HEADS}")
    c = self.config
    heads = tuple(h for h in heads if h in self.available_heads)
    needed = set().union(*(HEAD_INPUTS.get(h, c.modalities) for h in heads))
    routing = self.router(batch, train=train) if c.routing is not None else None  # (plan, aux)
    plan = routing[0] if routing is not None and route else None
    encoded = self.encode(batch, train, tuple(m for m in c.modalities if m in needed), plan, route)
    batch_size = len(_require(batch, c.modalities[0]))
    slots = {m: self.pools[m](*encoded[m]) for m in encoded if m not in self.token_pools or "pretrain" in heads}
    pooled = {m: self.token_pools[m](*encoded[m], batch.get(m) if m == TEXT else None) if m in self.token_pools
              else slots[m].reshape(batch_size, -1) for m in encoded}
    present = {
        m: jnp.asarray(batch[present_key(m)], bool) if present_key(m) in batch else jnp.ones((batch_size,), bool)
        for m in c.modalities
    }
    out: dict[str, Any] = {}
    if plan is not None:  # a skipped modality is absent downstream: fusion, losses and evaluators ignore it
      present = {m: present[m] & plan.selected[m] for m in c.modalities}
    if routing is not None:
      out["routing_aux"] = routing[1]
    out["present"] = present
    positions_shape = (-1, c.max_digits, c.num_labels + 1)
    if "embed" in heads:
      out["embeddings"] = {m: self.projections[m](pooled[m]) for m in c.modalities}
      out["logit_scale"], out["logit_bias"] = self.logit_scale, self.logit_bias
    if "pretrain" in heads:
      out["pretrain_logits"] = {m: self.pretrain_heads[m](slots[m][:, : c.max_digits]) for m in c.modalities}
    if "vqa" in heads:
      question = _require(batch, "question")
      if train and "extra_questions" in batch:  # more questions about the same image tokens: more VQA signal per step
        questions = jnp.concatenate([question[:, None], batch["extra_questions"]], axis=1)
        logits = self._answer_each(questions, encoded[IMAGE])  # one pass over all 1 + Q questions
        out["vqa_logits"], out["vqa_extra_logits"] = logits[:, 0], logits[:, 1:]
      else:
        out["vqa_logits"] = self.answer(question, encoded[IMAGE])
    if "tagging" in heads:
      out["tag_logits"] = self.tag_head(pooled[AUDIO])
    if "asr" in heads:
      out["ctc_logits"] = self.ctc_head(encoded[AUDIO][0])
      out["ctc_mask"] = encoded[AUDIO][1]
    if "fused" in heads:
      features = pooled
      if train and c.balance.method == "ogm_ge":
        features, out["balance_coeffs"] = self._ogm_ge(batch, pooled, present)
      fused, out["fusion_weights"] = self.fusion(features, present)
      out["fused_logits"] = self.fused_head(fused).reshape(positions_shape)
    if set(heads) & set(converter_lib.CONVERTER_HEADS):
      out.update(converter_lib.converter_outputs(self, batch, encoded, pooled, heads, train))
    return out

  def _answer_each(self, questions: Int[Array, "b q l"], image: enc.Encoded) -> Float[Array, "b q a"]:
    """VQA logits of Q questions per sample: each question is paired with its sample's image tokens."""
    count = questions.shape[1]
    tokens, mask = (jnp.repeat(x, count, axis=0) for x in image)
    logits = self.answer(questions.reshape(-1, questions.shape[-1]), (tokens, mask))
    return logits.reshape(questions.shape[0], count, -1)

  def _ogm_ge(self, batch: Mapping[str, Array], pooled: dict[str, Array], present: dict[str, Array]
              ) -> tuple[dict[str, Array], dict[str, Array]]:
    """OGM-GE on the pooled features: confidence of the fused head seeing each modality alone (no gradient)."""
    c = self.config
    digits, num_digits = _require(batch, "digits"), _require(batch, "num_digits")
    targets = position_targets(digits, num_digits, end=c.num_labels)
    weight = jnp.asarray(batch["weight"], jnp.float32) if "weight" in batch else jnp.ones(targets.shape[:1])
    frozen = {m: jax.lax.stop_gradient(x) for m, x in pooled.items()}
    confidence = {}
    for m in pooled:
      alone = {j: present[j] if j == m else jnp.zeros_like(present[j]) for j in present}
      logits = self.fused_head(self.fusion(frozen, alone)[0]).reshape(-1, c.max_digits, c.num_labels + 1)
      confidence[m] = balance_lib.true_class_confidence(logits, targets)
    coeffs = balance_lib.ogm_coefficients(balance_lib.modality_scores(confidence, present, weight), c.balance.alpha)
    if not self.has_rng("dropout"):
      raise ValueError("model.balance.method='ogm_ge' needs a 'dropout' rng in training (Gaussian-enhancement noise)")
    return balance_lib.apply_ogm_ge(pooled, coeffs, c.balance, self.make_rng("dropout")), coeffs
