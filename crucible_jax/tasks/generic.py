"""The generic tasks: contrastive retrieval, VQA as classification, multi-label tagging, CTC transcription,
captioning and image generation. A data source adds its own (`data/digit_world/tasks.py`)."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, present_key
from crucible_jax.eval.evaluators import AsrEvaluator, RetrievalEvaluator, TaggingEvaluator, VqaEvaluator
from crucible_jax.eval.generation import CaptionEvaluator
from crucible_jax.models.converter import caption_targets
from crucible_jax.models.crucible import HEAD_MODALITIES
from crucible_jax.tasks.registry import Batch, Task, TermContext, TermFn, fixed, one_modality, register
from crucible_jax.tasks.terms import modality_intact, modality_usable, output, sample_weight
from crucible_jax.train import losses


def _pair(arg: str) -> tuple[str, str]:
  first, _, second = arg.partition("-")
  if first not in MODALITIES or second not in MODALITIES or first == second:
    raise ValueError(f"objective term 'contrastive/{arg}': expected contrastive/<a>-<b>, a != b in {MODALITIES}")
  return first, second


def _contrastive_term(arg: str, key: str, ctx: TermContext) -> TermFn:
  first, second = _pair(arg)

  def term(outputs, batch):
    embeddings = output(outputs, "embeddings", key)
    a, b = embeddings[first], embeddings[second]
    weight = sample_weight(batch)
    kwargs = dict(valid=modality_usable(outputs, batch, first, second), ids=batch["string_id"], weight=weight)
    if ctx.gather_axes:  # inside a shard_map: every shard scores the global batch (all_gather's transpose sums grads)
      (a, b), kwargs = jax.lax.all_gather(((a, b), kwargs), tuple(ctx.gather_axes), tiled=True)
    scale = output(outputs, "logit_scale", key)
    if ctx.loss_kind == "clip":
      loss = (losses.clip_loss(a, b, scale, **kwargs) if ctx.mesh is None
              else losses.clip_loss_sharded(a, b, scale, ctx.mesh, ctx.batch_axes, **kwargs))
    else:
      bias = output(outputs, "logit_bias", key)
      loss = (losses.siglip_loss(a, b, scale, bias, **kwargs) if ctx.mesh is None
              else losses.siglip_loss_sharded(a, b, scale, bias, ctx.mesh, ctx.batch_axes, **kwargs))
    return loss, {}
  return term


def _vqa_term(arg: str, key: str, ctx: TermContext) -> TermFn:
  def term(outputs, batch):
    """Cross-entropy of the sample's question and, in training with `extra_questions`, of every extra one alike."""
    logits, answers = output(outputs, "vqa_logits", key), batch["answer"]
    weight = sample_weight(batch) * modality_intact(batch, IMAGE)
    if "vqa_extra_logits" in outputs:
      extra = outputs["vqa_extra_logits"]
      count = 1 + extra.shape[1]
      logits = jnp.concatenate([logits[:, None], extra], axis=1).reshape(-1, extra.shape[-1])
      answers = jnp.concatenate([answers[:, None], batch["extra_answers"]], axis=1).reshape(-1)
      weight = jnp.repeat(weight, count)
    correct = (jnp.argmax(logits, axis=-1) == answers).astype(jnp.float32)
    return losses.softmax_ce(logits, answers, weight), {"acc/vqa": losses.weighted_mean(correct, weight)}
  return term


def _tagging_term(arg: str, key: str, ctx: TermContext) -> TermFn:
  def term(outputs, batch):
    logits = output(outputs, "tag_logits", key)
    weight = sample_weight(batch) * modality_intact(batch, AUDIO)
    if "labels" not in batch:  # the multi-hot of the classes the label sequence holds (DigitWorld: its digits)
      return losses.multilabel_loss(logits, batch["digits"], weight), {}
    labels = batch["labels"].astype(jnp.float32)  # multi-hot from the source (AudioSet)
    if labels.shape != logits.shape:
      raise ValueError(f"tagging: batch['labels'] {labels.shape} and tag_logits {logits.shape} disagree "
                       f"(data.num_labels vs model.heads.num_tags)")
    logits = logits.astype(jnp.float32)
    bce = jnp.logaddexp(0.0, logits) - logits * labels  # sigmoid cross-entropy, stable for large |logits|
    return losses.weighted_mean(jnp.mean(bce, axis=1), weight), {}
  return term


def _asr_term(arg: str, key: str, ctx: TermContext) -> TermFn:
  def term(outputs, batch):
    weight = sample_weight(batch) * modality_usable(outputs, batch, AUDIO)
    loss = losses.ctc_loss(output(outputs, "ctc_logits", key), output(outputs, "ctc_mask", key),
                           batch["digits"], batch["num_digits"], weight)
    return loss, {}
  return term


def _caption_term(modality: str, key: str, ctx: TermContext) -> TermFn:
  """Teacher-forced token cross-entropy of the batch's `caption` (mean over its tokens, padding masked)."""
  def term(outputs, batch):
    logits = output(outputs, "caption_logits", key)
    if modality not in logits:
      raise ValueError(f"objective term {key!r}: {modality!r} is not in model.converter.caption_sources")
    logits = logits[modality]
    targets, mask = caption_targets(batch, logits.shape[1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    per_sample = jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    exact = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~mask, axis=1).astype(jnp.float32)
    return losses.weighted_mean(per_sample, weight), {f"acc/{key}": losses.weighted_mean(exact, weight)}
  return term


def _validate_caption(config: Any) -> None:
  """Captioning learns and scores the batch's `caption`: the data must render it, no longer than the decoder."""
  converter = config.model.get("converter") or {}
  caption_len, max_len = config.data.get("caption_len"), converter.get("max_len", 0)
  if not converter.get("enabled", False):
    raise ValueError("captioning needs the converter's text decoder: model.converter.enabled=False")
  if caption_len is None:
    raise ValueError(f"captioning learns and scores batch['caption'], which data.name={config.data.get('name')!r} "
                     f"does not render (no data.caption_len)")
  if not caption_len:
    raise ValueError("captioning learns and scores batch['caption'], which data.caption_len=0 leaves out")
  if caption_len > max_len:
    raise ValueError(f"data.caption_len={caption_len} exceeds model.converter.max_len={max_len}")


def imagine_term(modality: str, key: str, ctx: TermContext,
                 target_of: Callable[[Batch], Array] | None = None) -> TermFn:
  """Pixel MSE of the image decoded from `modality`'s shared embedding against the sample's own image, or against
  `target_of(batch)` (a source's drawing of the sample: `imagine` as a source re-registers it)."""
  if target_of is None and ctx.reference_glyphs is not None:
    raise ValueError(f"objective term {key!r}: reference images were given, but the generic imagine task draws "
                     f"none (the data source registers its own imagine term for model.converter.image_target)")

  def term(outputs, batch):
    images = output(outputs, "images", key)
    if modality not in images:
      raise ValueError(f"objective term {key!r}: {modality!r} is not in model.converter.image_sources")
    target = batch[IMAGE] if target_of is None else target_of(batch)
    error = jnp.square(images[modality].astype(jnp.float32) - target.astype(jnp.float32))
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    weight = weight * batch.get(present_key(IMAGE), jnp.ones_like(weight, bool)) * modality_intact(batch, IMAGE)
    return losses.weighted_mean(jnp.mean(error, axis=(1, 2, 3)), weight), {}
  return term


register(Task("contrastive", head="embed", outputs=("embeddings", "logit_scale", "logit_bias"),
              modalities=lambda arg: frozenset(_pair(arg)), term=_contrastive_term,
              evaluators={"retrieval": RetrievalEvaluator}))
register(Task("vqa", head="vqa", outputs=("vqa_logits",), modalities=fixed("vqa", HEAD_MODALITIES["vqa"]),
              term=_vqa_term, evaluators={"vqa": VqaEvaluator}))
register(Task("tagging", head="tagging", outputs=("tag_logits",),
              modalities=fixed("tagging", HEAD_MODALITIES["tagging"]), term=_tagging_term,
              evaluators={"tagging": TaggingEvaluator}))
register(Task("asr", head="asr", outputs=("ctc_logits", "ctc_mask"), modalities=fixed("asr", HEAD_MODALITIES["asr"]),
              term=_asr_term, evaluators={"asr": AsrEvaluator}))
register(Task("caption", head="caption", outputs=("caption_logits", "caption_ids"),
              modalities=one_modality("caption"), term=_caption_term, evaluators={"caption": CaptionEvaluator},
              validate=_validate_caption))
register(Task("imagine", head="imagine", outputs=("images",), modalities=one_modality("imagine"), term=imagine_term))
