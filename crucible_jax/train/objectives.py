"""Training objectives as data: a spec of weighted loss terms -> the heads they need and one loss function.

Spec keys (weight 0 = off): `pretrain/<m>`, `contrastive/<a>-<b>`, `vqa`, `tagging`, `asr`, `fused`,
`routing/budget`, `routing/balance`, `routing/utility` (need `model.routing.enabled`), `caption/<m>`,
`imagine/<m>` (need `model.converter.enabled`).
Every term's value is reported as `loss/<key>`, so a gradient-balancing scheme can read the per-term losses.
"""

import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, present_key
from crucible_jax.models.converter import caption_tokens, reference_images
from crucible_jax.train import losses

HEADS = ("embed", "pretrain", "vqa", "tagging", "asr", "fused", "caption", "imagine")  # model heads, in a fixed order
LOSS_KINDS = ("clip", "siglip")

Outputs = Mapping[str, Any]
Batch = Mapping[str, Array]
TermFn = Callable[[Outputs, Batch], tuple[Array, dict[str, Array]]]
ObjectiveFn = Callable[[Outputs, Batch], tuple[Array, dict[str, Array]]]


def _output(outputs: Outputs, key: str, term: str) -> Any:
  if key not in outputs:
    raise ValueError(f"objective term {term!r} needs model output {key!r}; outputs have {sorted(outputs)}")
  return outputs[key]


def sample_weight(batch: Batch) -> Array:
  """The batch's per-sample weight (0 = padding), ones when absent."""
  if "weight" in batch:
    return batch["weight"].astype(jnp.float32)
  return jnp.ones(batch["digits"].shape[:1], jnp.float32)


def modality_present(outputs: Outputs, batch: Batch, modality: str) -> Array:
  """Samples that carry `modality` in the data and (when the model says) were encoded."""
  in_data = batch.get(present_key(modality))
  encoded = outputs.get("present", {}).get(modality)
  if in_data is None and encoded is None:
    raise ValueError(f"neither batch[{present_key(modality)!r}] nor outputs['present'][{modality!r}] exists")
  if in_data is None or encoded is None:
    return encoded if in_data is None else in_data
  return in_data & encoded


def modality_intact(batch: Batch, modality: str) -> Array | bool:
  """False where the data deliberately corrupted `modality` (`<m>_corrupted`): it is then no target for tasks
  that read that modality alone (pretraining, contrastive pairs, ASR, tagging, VQA's image, captioning and image
  generation), as a curated corpus would not hold it. The fused task still sees it, so fusion and the router must
  learn to distrust it."""
  flags = batch.get(f"{modality}_corrupted")
  return True if flags is None else ~flags


def modality_usable(outputs: Outputs, batch: Batch, *modalities: str) -> Array:
  """Samples where every one of `modalities` is present, encoded and intact: what a unimodal target may read."""
  usable = [modality_present(outputs, batch, m) & modality_intact(batch, m) for m in modalities]
  return functools.reduce(operator.and_, usable)


def string_accuracy(logits: Array, digits: Array, num_digits: Array, weight: Array) -> Array:
  """Weighted share of samples whose every position (digits and NO_DIGIT tail) is predicted right."""
  exact = jnp.all(jnp.argmax(logits, axis=-1) == losses.digit_targets(digits, num_digits), axis=-1)
  return losses.weighted_mean(exact.astype(jnp.float32), weight)


def _pretrain_term(modality: str, key: str) -> TermFn:
  def term(outputs, batch):
    logits = _output(outputs, "pretrain_logits", key)[modality]
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    loss = losses.digit_string_loss(logits, batch["digits"], batch["num_digits"], weight)
    return loss, {f"acc/{key}": string_accuracy(logits, batch["digits"], batch["num_digits"], weight)}
  return term


def _contrastive_term(first: str, second: str, key: str, loss_kind: str, mesh: Mesh | None,
                      batch_axes: Sequence[str], gather_axes: Sequence[str]) -> TermFn:
  def term(outputs, batch):
    embeddings = _output(outputs, "embeddings", key)
    a, b = embeddings[first], embeddings[second]
    weight = sample_weight(batch)
    kwargs = dict(valid=modality_usable(outputs, batch, first, second), ids=batch["string_id"], weight=weight)
    if gather_axes:  # inside a shard_map: every shard scores the global batch (all_gather's transpose sums grads)
      (a, b), kwargs = jax.lax.all_gather(((a, b), kwargs), tuple(gather_axes), tiled=True)
    scale = _output(outputs, "logit_scale", key)
    if loss_kind == "clip":
      loss = (losses.clip_loss(a, b, scale, **kwargs) if mesh is None
              else losses.clip_loss_sharded(a, b, scale, mesh, batch_axes, **kwargs))
    else:
      bias = _output(outputs, "logit_bias", key)
      loss = (losses.siglip_loss(a, b, scale, bias, **kwargs) if mesh is None
              else losses.siglip_loss_sharded(a, b, scale, bias, mesh, batch_axes, **kwargs))
    return loss, {}
  return term


def _vqa_term(outputs, batch):
  """Cross-entropy of the sample's question and, in training with `extra_questions`, of every extra one alike."""
  logits, answers = _output(outputs, "vqa_logits", "vqa"), batch["answer"]
  weight = sample_weight(batch) * modality_intact(batch, IMAGE)
  if "vqa_extra_logits" in outputs:
    extra = outputs["vqa_extra_logits"]
    count = 1 + extra.shape[1]
    logits = jnp.concatenate([logits[:, None], extra], axis=1).reshape(-1, extra.shape[-1])
    answers = jnp.concatenate([answers[:, None], batch["extra_answers"]], axis=1).reshape(-1)
    weight = jnp.repeat(weight, count)
  correct = (jnp.argmax(logits, axis=-1) == answers).astype(jnp.float32)
  return losses.softmax_ce(logits, answers, weight), {"acc/vqa": losses.weighted_mean(correct, weight)}


def _tagging_term(outputs, batch):
  logits = _output(outputs, "tag_logits", "tagging")
  weight = sample_weight(batch) * modality_intact(batch, AUDIO)
  if "labels" not in batch:  # DigitWorld: the multi-hot of the digits present
    return losses.multilabel_loss(logits, batch["digits"], weight), {}
  labels = batch["labels"].astype(jnp.float32)  # multi-hot from the source (AudioSet)
  if labels.shape != logits.shape:
    raise ValueError(f"tagging: batch['labels'] {labels.shape} and tag_logits {logits.shape} disagree "
                     f"(data.num_labels vs model.heads.num_tags)")
  logits = logits.astype(jnp.float32)
  bce = jnp.logaddexp(0.0, logits) - logits * labels  # sigmoid cross-entropy, stable for large |logits|
  return losses.weighted_mean(jnp.mean(bce, axis=1), weight), {}


def _asr_term(outputs, batch):
  weight = sample_weight(batch) * modality_usable(outputs, batch, AUDIO)
  loss = losses.ctc_loss(_output(outputs, "ctc_logits", "asr"), _output(outputs, "ctc_mask", "asr"),
                         batch["digits"], batch["num_digits"], weight)
  return loss, {}


def _fused_term(outputs, batch):
  logits = _output(outputs, "fused_logits", "fused")
  weight = sample_weight(batch)
  loss = losses.digit_string_loss(logits, batch["digits"], batch["num_digits"], weight)
  return loss, {"acc/fused": string_accuracy(logits, batch["digits"], batch["num_digits"], weight)}


def _caption_term(modality: str, key: str) -> TermFn:
  """Teacher-forced token cross-entropy of the canonical caption (mean over its tokens, padding masked)."""
  def term(outputs, batch):
    logits = _output(outputs, "caption_logits", key)
    if modality not in logits:
      raise ValueError(f"objective term {key!r}: {modality!r} is not in model.converter.caption_sources")
    logits = logits[modality]
    _, targets, mask = caption_tokens(batch["digits"], batch["num_digits"], logits.shape[1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    per_sample = jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    exact = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~mask, axis=1).astype(jnp.float32)
    return losses.weighted_mean(per_sample, weight), {f"acc/{key}": losses.weighted_mean(exact, weight)}
  return term


def _imagine_term(modality: str, key: str, reference_glyphs: np.ndarray | None) -> TermFn:
  """Pixel MSE of the image decoded from `modality`'s shared embedding against the sample's own image, or, given
  `reference_glyphs` [10, H, H], against its digit string drawn in that reference hand (`reference_images`)."""
  def term(outputs, batch):
    images = _output(outputs, "images", key)
    if modality not in images:
      raise ValueError(f"objective term {key!r}: {modality!r} is not in model.converter.image_sources")
    target = batch[IMAGE] if reference_glyphs is None else reference_images(
        reference_glyphs, batch["digits"], batch[IMAGE].shape[2])
    error = jnp.square(images[modality].astype(jnp.float32) - target.astype(jnp.float32))
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    weight = weight * batch.get(present_key(IMAGE), jnp.ones_like(weight, bool)) * modality_intact(batch, IMAGE)
    return losses.weighted_mean(jnp.mean(error, axis=(1, 2, 3)), weight), {}
  return term


def _routing_term(name: str) -> TermFn:
  """The router's `<name>_loss` from `outputs['routing_aux']`; the budget term also reports per-modality usage."""
  def term(outputs, batch):
    if "routing_aux" not in outputs:
      raise ValueError(f"objective term 'routing/{name}' needs model output 'routing_aux': set model.routing.enabled")
    aux = outputs["routing_aux"]
    extra = {f"routing/usage_{m}": u for m, u in aux["usage"].items()} if name == "budget" else {}
    return aux[f"{name}_loss"], extra
  return term


def _routing_utility_term(outputs, batch):
  """Teaches the router's estimator what each encoded modality is worth to this sample: sigmoid(score) regresses,
  by binary cross-entropy, the probability that the modality's own pretrain head names the digits (exp of minus its
  per-position CE, held constant). A modality that cannot be read (blank, noise, a caption of other digits) earns a
  low score and gives its capacity to a sample that needs it."""
  if "routing_aux" not in outputs:
    raise ValueError("objective term 'routing/utility' needs model output 'routing_aux': set model.routing.enabled")
  scores, logits = outputs["routing_aux"]["scores"], _output(outputs, "pretrain_logits", "routing/utility")
  targets, terms, metrics = losses.digit_targets(batch["digits"], batch["num_digits"]), [], {}
  for m, score in scores.items():
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[m].astype(jnp.float32), targets).mean(axis=1)
    utility = jax.lax.stop_gradient(jnp.exp(-ce))
    weight = sample_weight(batch) * modality_present(outputs, batch, m)  # encoded samples only: others had no read-out
    terms.append(losses.weighted_mean(optax.sigmoid_binary_cross_entropy(score.astype(jnp.float32), utility), weight))
    metrics[f"routing/utility_{m}"] = losses.weighted_mean(utility, weight)
  return jnp.mean(jnp.stack(terms)), metrics


def _parse_term(key: str, loss_kind: str, mesh: Mesh | None, batch_axes: Sequence[str],
                reference_glyphs: np.ndarray | None, gather_axes: Sequence[str] = ()) -> tuple[str | None, TermFn]:
  """(head, term function) for one spec key; ValueError naming the key if it is not understood."""
  fixed = {"vqa": ("vqa", _vqa_term), "tagging": ("tagging", _tagging_term), "asr": ("asr", _asr_term),
           "fused": ("fused", _fused_term),
           # The router runs with any head, so routing terms ask for none.
           "routing/budget": (None, _routing_term("budget")), "routing/balance": (None, _routing_term("balance")),
           "routing/utility": ("pretrain", _routing_utility_term)}
  if key in fixed:
    return fixed[key]
  family, _, rest = key.partition("/")
  if family == "pretrain" and rest in MODALITIES:
    return "pretrain", _pretrain_term(rest, key)
  if family == "caption" and rest in MODALITIES:
    return family, _caption_term(rest, key)
  if family == "imagine" and rest in MODALITIES:
    return family, _imagine_term(rest, key, reference_glyphs)
  if family == "contrastive":
    first, _, second = rest.partition("-")
    if first in MODALITIES and second in MODALITIES and first != second:
      return "embed", _contrastive_term(first, second, key, loss_kind, mesh, batch_axes, gather_axes)
  raise ValueError(f"unknown objective term {key!r}; expected pretrain/<m>, contrastive/<a>-<b> (m in "
                   f"{MODALITIES}, a != b), vqa, tagging, asr, fused, routing/budget, routing/balance, "
                   f"routing/utility, caption/<m> or imagine/<m>")


def build_objective(spec: Mapping[str, float], *, loss_kind: str = "clip", mesh: Mesh | None = None,
                    batch_axes: Sequence[str] = ("data", "fsdp"), reference_glyphs: np.ndarray | None = None,
                    gather_axes: Sequence[str] = ()) -> tuple[tuple[str, ...], ObjectiveFn]:
  """The model heads a weighted sum of loss terms needs, and fn(outputs, batch) -> (loss, metrics).

  With `mesh`, contrastive terms use the ring-chunked losses over `batch_axes` (call fn under jit); with
  `gather_axes` (fn runs per shard inside a shard_map over them), contrastive terms all-gather the shards'
  embeddings and score the global batch; with `reference_glyphs`, `imagine/<m>` terms draw the digits in that
  reference hand instead of the sample's image.
  """
  if loss_kind not in LOSS_KINDS:
    raise ValueError(f"loss_kind {loss_kind!r} is not one of {LOSS_KINDS}")
  terms, used_heads = [], set()
  for key, weight in spec.items():
    head, fn = _parse_term(key, loss_kind, mesh, batch_axes, reference_glyphs, gather_axes)
    weight = float(weight)
    if weight < 0:
      raise ValueError(f"objective term {key!r} has negative weight {weight}")
    if weight > 0:
      terms.append((key, weight, fn))
      used_heads.add(head)
  if not terms:
    raise ValueError(f"objective spec {dict(spec)} has no term with a positive weight")

  def objective(outputs: Outputs, batch: Batch) -> tuple[Array, dict[str, Array]]:
    total, metrics = jnp.zeros((), jnp.float32), {}
    for key, weight, fn in terms:
      loss, extra = fn(outputs, batch)
      metrics[f"loss/{key}"] = loss
      metrics.update(extra)
      total = total + weight * loss
    metrics["loss"] = total
    return total, metrics

  return tuple(h for h in HEADS if h in used_heads), objective
