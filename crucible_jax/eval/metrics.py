"""Host-side (numpy) metrics: retrieval R@K and mAP@K, VQA soft accuracy, multi-label mAP, WER, CTC decoding."""

import re
import string
from typing import Sequence

import numpy as np


def retrieval_metrics(sim: np.ndarray, query_ids: np.ndarray, cand_ids: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      map_k: int = 10) -> dict[str, float]:
  """Recall@K and mAP@`map_k` for a [queries, candidates] similarity matrix; same id = relevant.

  A query counts as a hit at K when any relevant candidate ranks in its top K. AP@K sums precision at each relevant
  rank within the top K and divides by min(#relevant, K), so a perfect ranking scores 1. Equal similarities rank
  by candidate index (stable sort). A query with no relevant candidate scores 0 everywhere.
  """
  sim, query_ids, cand_ids = np.asarray(sim), np.asarray(query_ids), np.asarray(cand_ids)
  if sim.shape != (len(query_ids), len(cand_ids)):
    raise ValueError(f"sim has shape {sim.shape}, ids say ({len(query_ids)}, {len(cand_ids)})")
  if sim.size == 0:
    raise ValueError("retrieval needs at least one query and one candidate")
  order = np.argsort(-sim, axis=1, kind="stable")
  relevant = cand_ids[order] == query_ids[:, None]  # [Q, C], in rank order
  first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), np.inf)
  result = {f"R@{k}": float(np.mean(first_hit < k)) for k in ks}
  top = relevant[:, :map_k]
  precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
  num_relevant = np.minimum(relevant.sum(axis=1), map_k)
  ap = np.sum(precision_at_rank * top, axis=1) / np.maximum(num_relevant, 1)
  result[f"mAP@{map_k}"] = float(np.mean(ap))
  return result


def _normalise_answer(answer: str) -> str:
  return " ".join(answer.lower().split())


def vqa_soft_accuracy(pred: Sequence[str], answers: Sequence[Sequence[str]], *, official: bool = True) -> float:
  """Mean VQA accuracy: an answer is fully right when at least 3 annotators gave it.

  simple: min(#annotators matching / 3, 1) over all annotators.
  official (VQA v2 evaluation code): the same, averaged over the leave-one-out subsets of annotators (the 10 choose 9
  subsets for 10 answers); e.g. 3 of 10 matching scores 1.0 simple but 0.9 official, 1 of 10 scores 1/3 vs 0.3.
  With fewer than 3 (remaining) annotators the threshold drops to their count, so one answer per question is exact
  match. Answers are compared after lowercasing and collapsing whitespace (not the full official normalisation).
  """
  if len(pred) != len(answers):
    raise ValueError(f"{len(pred)} predictions for {len(answers)} questions")
  if not pred:
    raise ValueError("vqa_soft_accuracy needs at least one question")
  scores = []
  for i, (guess, humans) in enumerate(zip(pred, answers)):
    if not humans:
      raise ValueError(f"question {i} has no reference answers")
    matches = np.array([_normalise_answer(h) == _normalise_answer(guess) for h in humans], np.float64)
    if not official or len(humans) == 1:
      scores.append(min(matches.sum() / min(3, len(humans)), 1.0))
      continue
    others = matches.sum() - matches  # matches among the other annotators, leaving each one out in turn
    scores.append(float(np.mean(np.minimum(others / min(3, len(humans) - 1), 1.0))))
  return float(np.mean(scores))


def multilabel_map(scores: np.ndarray, labels: np.ndarray) -> float:
  """Macro mean over classes with at least one positive of average precision (AudioSet style, sklearn's AP)."""
  from sklearn.metrics import average_precision_score  # heavy import, only where used

  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same [samples, classes] shape")
  has_positive = labels.sum(axis=0) > 0
  if not has_positive.any():
    raise ValueError("multilabel_map: no class has a positive label")
  return float(np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(has_positive)]))


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation.replace(chr(39), ''))}]")


def normalise_transcript(text: str) -> list[str]:
  """Words after lowercasing, dropping apostrophes, turning other punctuation into spaces, collapsing whitespace."""
  return _PUNCTUATION.sub(" ", text.lower().replace("'", "")).split()


def word_edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
  """Levenshtein distance over words (substitutions, insertions and deletions each cost 1)."""
  row = np.arange(len(hyp) + 1)
  for i, ref_word in enumerate(ref, start=1):
    prev, row = row, np.empty_like(row)
    row[0] = i
    for j, hyp_word in enumerate(hyp, start=1):
      row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ref_word != hyp_word))
  return int(row[-1])


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Total word edit distance over total reference words, after `normalise_transcript`."""
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references for {len(hyps)} hypotheses")
  ref_words = [normalise_transcript(r) for r in refs]
  total = sum(len(r) for r in ref_words)
  if total == 0:
    raise ValueError("word_error_rate: the references hold no words")
  return sum(word_edit_distance(r, normalise_transcript(h)) for r, h in zip(ref_words, hyps)) / total


def token_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
  """Total edit distance over total reference tokens, for label sequences (WER when each label is a word)."""
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references for {len(hyps)} hypotheses")
  total = sum(len(r) for r in refs)
  if total == 0:
    raise ValueError("token_error_rate: the references hold no tokens")
  return sum(word_edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def ctc_greedy_decode(logits: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Best-path decoding over valid frames: argmax, collapse repeats, drop blanks (0), class c -> digit c-1."""
  logits, mask = np.asarray(logits), np.asarray(mask, bool)
  if logits.shape[:2] != mask.shape:
    raise ValueError(f"logits {logits.shape} and mask {mask.shape} disagree on [batch, frames]")
  decoded = []
  for best, valid in zip(np.argmax(logits, axis=-1), mask):
    path = best[valid]
    keep = np.concatenate([[True], path[1:] != path[:-1]]) & (path != 0) if path.size else np.zeros(0, bool)
    decoded.append([int(c) - 1 for c in path[keep]])
  return decoded
