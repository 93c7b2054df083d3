"""Generic evaluators (retrieval, VQA, tagging, ASR): accumulate on host, then score. Tasks register them
(`tasks/generic.py`); the trainer builds them from config (`config.evals.NAME = dict(...)`, `tasks.build_evaluators`).

Each evaluator says which model `heads` it needs, takes `update(outputs, batch)` per batch (numpy arrays; rows with
`batch["weight"] == 0` are padding) and returns `{"task/metric": value}` from `result()`; the trainer adds the split.
`outputs` and `batch` are the whole global batch on every process; the raw modality inputs (image, text, audio,
video) are in `batch` only for an evaluator that names them in an `inputs` attribute.
"""

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from crucible_jax.common_types import MODALITIES
from crucible_jax.eval import metrics
from crucible_jax.eval.rows import present_rows, real_rows

DEFAULT_PAIRS = (("image", "text"), ("text", "image"), ("audio", "image"), ("video", "text"))


class Evaluator(Protocol):
  """What the trainer drives: compute `heads`, feed every eval batch to `update`, read `result` once."""

  heads: tuple[str, ...]

  def update(self, outputs: Mapping[str, Any], batch: Mapping[str, np.ndarray]) -> None:
    ...

  def result(self) -> dict[str, float]:
    ...


def _join(chunks: list[np.ndarray]) -> np.ndarray:
  """The rows gathered over updates (empty when there were none)."""
  return np.concatenate(chunks) if chunks else np.zeros(0)


def _mean(chunks: list[np.ndarray]) -> float:
  joined = _join(chunks)
  return float(np.mean(joined)) if joined.size else float("nan")


class RetrievalEvaluator:
  """Cross-modal retrieval over the whole split: every sample is a candidate; any same-id candidate is a hit."""

  heads = ("embed",)

  def __init__(self, pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS, ks: Sequence[int] = (1, 5, 10)):
    self.pairs = tuple((str(q), str(c)) for q, c in pairs)
    for pair in self.pairs:
      if pair[0] not in MODALITIES or pair[1] not in MODALITIES:
        raise ValueError(f"retrieval pair {pair} names a modality outside {MODALITIES}")
    self.ks = tuple(ks)
    self._embeddings = {m: [] for pair in self.pairs for m in pair}
    self._ids = {m: [] for m in self._embeddings}

  def update(self, outputs, batch):
    real = real_rows(batch)
    for m in self._embeddings:
      keep = real & present_rows(outputs, batch, m)
      self._embeddings[m].append(np.asarray(outputs["embeddings"][m], np.float32)[keep])
      self._ids[m].append(np.asarray(batch["string_id"])[keep])

  def result(self):
    out = {}
    for query, cand in self.pairs:
      q_emb, c_emb = _join(self._embeddings[query]), _join(self._embeddings[cand])
      if not len(q_emb) or not len(c_emb):
        continue  # the split has no sample of one side; nothing honest to report
      scores = metrics.retrieval_metrics(q_emb @ c_emb.T, np.concatenate(self._ids[query]),
                                         np.concatenate(self._ids[cand]), self.ks)
      out.update({f"{query}_to_{cand}/{name}": value for name, value in scores.items()})
    return out


class VqaEvaluator:
  """VQA accuracy, overall and per question type: the official soft accuracy over the human answers where the batch
  carries `answers` (VQA v2), else exact match with `answer` (= soft accuracy with one reference answer)."""

  heads = ("vqa",)

  def __init__(self):
    self._correct, self._types = [], []

  def update(self, outputs, batch):
    real = real_rows(batch)
    pred = np.argmax(np.asarray(outputs["vqa_logits"]), axis=-1)
    correct = (pred == np.asarray(batch["answer"])).astype(np.float64)
    if "answers" in batch:  # vocabulary indices of the human answers, -1 = padding (-2 = outside the vocabulary)
      for row, humans in enumerate(np.asarray(batch["answers"])):
        humans = [str(a) for a in humans if a != -1]
        if humans:
          correct[row] = metrics.vqa_soft_accuracy([str(pred[row])], [humans])
    self._correct.append(correct[real])
    self._types.append(np.asarray(batch["question_type"])[real])

  def result(self):
    correct, types = _join(self._correct), _join(self._types)
    if not correct.size:
      return {}
    out = {"vqa/accuracy": _mean([correct])}
    out.update({f"vqa/accuracy_{t}": _mean([correct[types == t]]) for t in np.unique(types)})
    return out


class TaggingEvaluator:
  """Multi-label tagging: mAP of sigmoid(tag_logits) over `labels` (when the batch has them) or the label classes
  a sample's label sequence holds (DigitWorld: which digits)."""

  heads = ("tagging",)

  def __init__(self, modality: str | None = None):
    self.modality = modality  # if set, only samples carrying it are scored
    self._scores, self._labels = [], []

  def update(self, outputs, batch):
    keep = real_rows(batch) & (present_rows(outputs, batch, self.modality) if self.modality else True)
    logits = np.asarray(outputs["tag_logits"], np.float64)
    self._scores.append((1 / (1 + np.exp(-logits)))[keep])
    if "labels" in batch:  # multi-hot from the source (AudioSet's 527 classes)
      self._labels.append((np.asarray(batch["labels"]) > 0.5)[keep])
    else:  # the classes the sample's label sequence holds (DigitWorld: which digits)
      digits = np.asarray(batch["digits"])
      self._labels.append(np.any(digits[:, :, None] == np.arange(logits.shape[-1]), axis=1)[keep])

  def result(self):
    scores, labels = _join(self._scores), _join(self._labels)
    return {"tagging/mAP": metrics.multilabel_map(scores, labels)} if len(scores) else {}


class AsrEvaluator:
  """Transcription: error rate of CTC greedy decodes against the batch's label sequences (`digits`, `num_digits`),
  one label a word (DigitWorld: a spoken digit), and the share of exactly right sequences."""

  heads = ("asr",)

  def __init__(self, modality: str = "audio"):
    self.modality = modality
    self._refs, self._hyps = [], []

  def update(self, outputs, batch):
    keep = real_rows(batch) & present_rows(outputs, batch, self.modality)
    decoded = metrics.ctc_greedy_decode(outputs["ctc_logits"], outputs["ctc_mask"])
    digits, lengths = np.asarray(batch["digits"]), np.asarray(batch["num_digits"])
    for row in np.flatnonzero(keep):
      self._refs.append([int(d) for d in digits[row, :lengths[row]]])
      self._hyps.append(decoded[row])

  def result(self):
    if not self._refs:
      return {}
    wer = metrics.token_error_rate(self._refs, self._hyps)
    exact = np.mean([r == h for r, h in zip(self._refs, self._hyps)])
    return {"asr/wer": wer, "asr/string_accuracy": float(exact)}
