"""What every objective term reads: model outputs by key, per-sample weights and which samples a modality may teach."""

import functools
import operator
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array

from crucible_jax.common_types import present_key
from crucible_jax.models.heads import position_targets
from crucible_jax.tasks.registry import Batch, Outputs
from crucible_jax.train import losses


def output(outputs: Outputs, key: str, term: str) -> Any:
  """outputs[key], or a ValueError naming the term that needs it."""
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


def position_accuracy(logits: Array, labels: Array, lengths: Array, weight: Array) -> Array:
  """Weighted share of samples whose every position (labels and the end-class tail) is predicted right."""
  exact = jnp.all(jnp.argmax(logits, axis=-1) == position_targets(labels, lengths, end=logits.shape[-1] - 1), axis=-1)
  return losses.weighted_mean(exact.astype(jnp.float32), weight)
