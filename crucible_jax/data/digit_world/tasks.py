"""DigitWorld's own tasks: reading the digit string from each modality (`pretrain`) and from all of them fused
(`fused`), scored by exact string accuracy; its VQA question types; `imagine` extended with the digit string drawn in
the reference glyphs as target and the glyph recogniser that reads generated images (`image_generation`).

Registered when a DigitWorld config is validated (`data/registry.py`); models, train and eval never import it.
"""

import dataclasses
from typing import Sequence

import numpy as np

from crucible_jax.common_types import IMAGE, MODALITIES
from crucible_jax.data.digit_world.draw import reference_glyphs_of
from crucible_jax.data.digit_world.recognizer import ImageGenerationEvaluator
from crucible_jax.data.digit_world.targets import reference_images
from crucible_jax.data.digit_world.templates import QUESTION_TYPES
from crucible_jax.eval.rows import present_rows, real_rows
from crucible_jax.models.heads import position_targets
from crucible_jax import tasks as tasks_lib
from crucible_jax.tasks.generic import imagine_term
from crucible_jax.tasks.registry import SourceExtras, Task, TermContext, TermFn
from crucible_jax.tasks.terms import modality_usable, output, position_accuracy, sample_weight
from crucible_jax.train import losses


def _pretrain_term(modality: str, key: str, ctx: TermContext) -> TermFn:
  def term(outputs, batch):
    logits = output(outputs, "pretrain_logits", key)[modality]
    weight = sample_weight(batch) * modality_usable(outputs, batch, modality)
    loss = losses.position_loss(logits, batch["digits"], batch["num_digits"], weight)
    return loss, {f"acc/{key}": position_accuracy(logits, batch["digits"], batch["num_digits"], weight)}
  return term


def _fused_term(arg: str, key: str, ctx: TermContext) -> TermFn:
  def term(outputs, batch):
    logits = output(outputs, "fused_logits", key)
    weight = sample_weight(batch)
    loss = losses.position_loss(logits, batch["digits"], batch["num_digits"], weight)
    return loss, {"acc/fused": position_accuracy(logits, batch["digits"], batch["num_digits"], weight)}
  return term


def _imagine_term(modality: str, key: str, ctx: TermContext) -> TermFn:
  """The generic imagine term; with `ctx.reference_glyphs` [10, H, H], its target is the digit string in them."""
  glyphs = ctx.reference_glyphs
  if glyphs is None:
    return imagine_term(modality, key, ctx)
  return imagine_term(modality, key, ctx, target_of=lambda batch: reference_images(glyphs, batch["digits"],
                                                                                    batch[IMAGE].shape[2]))


def _mean(chunks: list[np.ndarray]) -> float:
  joined = np.concatenate(chunks) if chunks else np.zeros(0)
  return float(np.mean(joined)) if joined.size else float("nan")


def _exact(logits: np.ndarray, batch, keep: np.ndarray) -> np.ndarray:
  """Rows of `keep` whose every position, the end-class tail included, is predicted right."""
  logits = np.asarray(logits)
  targets = position_targets(np.asarray(batch["digits"]), np.asarray(batch["num_digits"]), end=logits.shape[-1] - 1)
  return np.all(np.argmax(logits, axis=-1) == targets, axis=-1)[keep]


class FusedEvaluator:
  """Exact string accuracy of the fused-modality digit head."""

  heads = ("fused",)

  def __init__(self):
    self._correct = []

  def update(self, outputs, batch):
    self._correct.append(_exact(outputs["fused_logits"], batch, real_rows(batch)))

  def result(self):
    return {"fused/accuracy": _mean(self._correct)} if sum(map(len, self._correct)) else {}


class PretrainEvaluator:
  """Exact string accuracy of each modality's unimodal pretraining head, on the samples that carry it."""

  heads = ("pretrain",)

  def __init__(self, modalities: Sequence[str] = MODALITIES):
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
      raise ValueError(f"pretrain evaluator: unknown modalities {unknown}")
    self.modalities = tuple(modalities)
    self._correct = {m: [] for m in self.modalities}

  def update(self, outputs, batch):
    real = real_rows(batch)
    for m in self.modalities:
      keep = real & present_rows(outputs, batch, m)
      self._correct[m].append(_exact(outputs["pretrain_logits"][m], batch, keep))

  def result(self):
    return {f"pretrain/accuracy_{m}": _mean(self._correct[m]) for m in self.modalities
            if sum(map(len, self._correct[m]))}


tasks_lib.register(Task("pretrain", head="pretrain", outputs=("pretrain_logits",),
                        modalities=tasks_lib.one_modality("pretrain"), term=_pretrain_term,
                        evaluators={"pretrain": PretrainEvaluator}, source="digit_world"))
tasks_lib.register(Task("fused", head="fused", outputs=("fused_logits",), modalities=tasks_lib.fixed("fused", ()),
                        term=_fused_term, evaluators={"fused": FusedEvaluator}, source="digit_world"))
_imagine = tasks_lib.get("imagine")
tasks_lib.register(dataclasses.replace(_imagine, term=_imagine_term, evaluators={
    **_imagine.evaluators, "image_generation": ImageGenerationEvaluator}))
tasks_lib.register_source("digit_world", SourceExtras(question_types=QUESTION_TYPES,
                                                      reference_glyphs=reference_glyphs_of))
