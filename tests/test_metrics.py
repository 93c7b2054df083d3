"""Evaluation metrics against hand-computed cases; evaluators on tiny fake model outputs."""

import ml_collections
import numpy as np
import pytest

import crucible_jax.data.digit_world.tasks  # noqa: F401  (registers DigitWorld's fused and pretrain tasks)
from crucible_jax import tasks
from crucible_jax.eval import metrics


def test_retrieval_recall_and_map_with_same_id_candidates():
  sim = np.array([[0.9, 0.8, 0.8, 0.1],   # id 7: relevant candidates (id 7) at ranks 2 and 3
                  [0.2, 0.3, 0.1, 0.5],   # id 1: relevant candidate first
                  [0.0, 0.0, 0.5, 0.5]])  # id 1: tied with an irrelevant candidate of lower index: ranks 2nd
  result = metrics.retrieval_metrics(sim, np.array([7, 1, 1]), np.array([3, 7, 7, 1]))
  assert result["R@1"] == pytest.approx(1 / 3)
  assert result["R@5"] == result["R@10"] == pytest.approx(1.0)
  ap = [(1 / 2 + 2 / 3) / 2, 1.0, 1 / 2]
  assert result["mAP@10"] == pytest.approx(np.mean(ap))


def test_retrieval_counts_only_the_top_k_and_misses_without_relevant():
  sim = -np.arange(12, dtype=float)[None].repeat(2, 0)  # candidate i ranks i+1
  cand_ids = np.array([0] * 10 + [5, 6])
  result = metrics.retrieval_metrics(sim, np.array([5, 9]), cand_ids, ks=(10, 11, 50))
  assert result == {"R@10": 0.0, "R@11": 0.5, "R@50": 0.5, "mAP@10": 0.0}
  with pytest.raises(ValueError, match="shape"):
    metrics.retrieval_metrics(sim, np.array([5]), cand_ids)


def test_vqa_soft_accuracy_official_and_simple():
  three = ["two"] * 3 + ["three"] * 7
  one = ["two"] + ["four"] * 9
  many = ["two"] * 4 + ["one"] * 6
  preds, answers = ["Two ", "two", "two", "five"], [three, one, many, many]
  assert metrics.vqa_soft_accuracy(preds, answers, official=False) == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)
  # Official: leaving out one of the 3 matching annotators leaves 2/3; that happens in 3 of the 10 subsets.
  assert metrics.vqa_soft_accuracy(preds, answers) == pytest.approx((0.9 + 0.3 + 1 + 0) / 4)
  # One reference answer per question: exact match under both variants.
  for official in (True, False):
    assert metrics.vqa_soft_accuracy(["2", "3"], [["2"], ["4"]], official=official) == 0.5
  with pytest.raises(ValueError, match="question 0"):
    metrics.vqa_soft_accuracy(["2"], [[]])


def test_multilabel_map_is_macro_average_precision_over_classes_with_positives():
  scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.4, 0.2], [0.3, 0.6, 0.9], [0.1, 0.2, 0.1]])
  labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])  # class 2 has no positive: skipped
  # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: its positive ranks 3rd -> 1/3.
  assert metrics.multilabel_map(scores, labels) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_word_error_rate_counts_edits_after_normalisation():
  refs = ["The cat, sat on the MAT.", "hello world", "one two three", "don't stop"]
  hyps = ["the cat sat on a mat", "hello big  world again", "one three", "dont   stop!"]
  # 1 substitution + 2 insertions + 1 deletion over 6 + 2 + 3 + 2 reference words.
  assert metrics.word_error_rate(refs, hyps) == pytest.approx(4 / 13)
  assert metrics.word_error_rate(["a b"], ["a b"]) == 0.0
  with pytest.raises(ValueError, match="2 references"):
    metrics.word_error_rate(refs[:2], hyps)


def _one_hot_frames(classes: list[list[int]], frames: int, num_classes: int = 11) -> np.ndarray:
  logits = np.zeros((len(classes), frames, num_classes), np.float32)
  for row, path in enumerate(classes):
    logits[row, np.arange(len(path)), path] = 5.0
  return logits


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
  logits = _one_hot_frames([[1, 1, 0, 1, 2, 2, 0, 0, 3], [0] * 9, [4, 4, 4, 5, 0, 0, 0, 0, 0]], frames=9)
  mask = np.ones((3, 9), bool)
  mask[0, 8] = False  # the final "3" lies in padding
  assert metrics.ctc_greedy_decode(logits, mask) == [[0, 0, 1], [], [3, 4]]
  assert metrics.ctc_greedy_decode(logits, np.ones((3, 9), bool))[0] == [0, 0, 1, 2]


# ---- Evaluators on fake outputs. ----


def _eye(i, d=4):
  return np.eye(d, dtype=np.float32)[i]


def _split(outputs, batch, rows):
  """A sub-batch (and its outputs), so evaluators see more than one update."""
  take = lambda tree: {k: take(v) if isinstance(v, dict) else np.asarray(v)[rows] for k, v in tree.items()}
  return take(outputs), take(batch)


def test_retrieval_evaluator_ignores_padding_and_absent_candidates():
  outputs = {"embeddings": {"image": np.stack([_eye(0), _eye(1), _eye(2), _eye(1)]),
                            "text": np.stack([_eye(0), _eye(0), _eye(2), _eye(1)])}}
  batch = {"string_id": np.array([0, 1, 2, 1]), "weight": np.array([1, 1, 1, 0], np.float32),
           "digits": np.zeros((4, 2), np.int32), "image_present": np.ones(4, bool),
           "text_present": np.array([True, True, False, True])}
  evaluator = tasks.build_evaluators({"retrieval": {"pairs": [["image", "text"]]}})["retrieval"]
  assert evaluator.heads == ("embed",)
  for rows in ([0, 1], [2, 3]):
    evaluator.update(*_split(outputs, batch, rows))
  result = evaluator.result()
  # id 0 hits first (tie broken by index); id 1 ranks 2nd (its text looks like id 0); id 2 has no text candidate.
  # Counting padding row 3 (text e1, id 1) would make id 1 a first-rank hit.
  assert result["image_to_text/R@1"] == pytest.approx(1 / 3)
  assert result["image_to_text/R@5"] == pytest.approx(2 / 3)
  assert result["image_to_text/mAP@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)


def _digit_batch():
  return {"digits": np.array([[1, 2, -1], [3, -1, -1], [5, 6, 7], [0, -1, -1], [9, -1, -1]], np.int32),
          "num_digits": np.array([2, 1, 3, 1, 1], np.int32), "weight": np.array([1, 1, 1, 1, 0], np.float32),
          "audio_present": np.array([True, True, True, False, True]),
          "image_present": np.ones(5, bool), "answer": np.array([2, 0, 1, 1, 0], np.int32),
          "question_type": np.array([0, 1, 1, 0, 0], np.int32)}


def _string_logits(strings: list[list[int]], max_digits=3):
  logits = np.zeros((len(strings), max_digits, 11), np.float32)
  for row, s in enumerate(strings):
    logits[row, np.arange(max_digits), s + [10] * (max_digits - len(s))] = 1.0
  return logits


def test_asr_evaluator_wer_and_string_accuracy():
  batch = _digit_batch()
  # Decodes: [1, 2] right; [3, 3] one insertion; [5, 7] one deletion; row 3 lacks audio; row 4 is padding.
  ctc = _one_hot_frames([[2, 0, 3], [4, 0, 4], [6, 8, 8], [1, 1, 1], [1, 1, 1]], frames=4)
  outputs = {"ctc_logits": ctc, "ctc_mask": np.array([[1, 1, 1, 0]] * 5, bool)}
  evaluator = tasks.build_evaluators({"asr": {}})["asr"]
  evaluator.update(outputs, batch)
  assert evaluator.result() == pytest.approx({"asr/wer": 2 / 6, "asr/string_accuracy": 1 / 3})


def test_vqa_tagging_fused_and_pretrain_evaluators():
  batch = _digit_batch()
  vqa_logits = np.eye(3, dtype=np.float32)[[2, 1, 1, 0, 0]]  # right, wrong, right, wrong, (padding)
  tag_logits = np.where(np.any(batch["digits"][:, :, None] == np.arange(10), axis=1), 3.0, -3.0)
  tag_logits[4] = -tag_logits[4]  # padding row scored backwards: would lower the mAP if counted
  strings = [[1, 2], [3], [5, 6, 7], [0, 1], [8]]  # row 3 wrong, row 4 padding
  outputs = {"vqa_logits": vqa_logits, "tag_logits": tag_logits, "fused_logits": _string_logits(strings),
             "pretrain_logits": {"audio": _string_logits([[1, 2], [4], [5, 6, 7], [0], [9]]),
                                 "image": _string_logits(strings)},
             "present": {"audio": batch["audio_present"], "image": batch["image_present"]}}
  config = {"vqa": {}, "tagging": {}, "fused": {},
            "image_pretrain": {"kind": "pretrain", "modalities": ("audio", "image")}}
  built = tasks.build_evaluators(ml_collections.ConfigDict(config))
  assert {name: e.heads for name, e in built.items()} == {
      "vqa": ("vqa",), "tagging": ("tagging",), "fused": ("fused",), "image_pretrain": ("pretrain",)}
  results = {}
  for evaluator in built.values():
    evaluator.update(outputs, batch)
    results.update(evaluator.result())
  assert results == pytest.approx({
      "vqa/accuracy": 0.5, "vqa/accuracy_0": 0.5, "vqa/accuracy_1": 0.5, "tagging/mAP": 1.0,
      "fused/accuracy": 0.75, "pretrain/accuracy_image": 0.75,
      "pretrain/accuracy_audio": 2 / 3})  # row 1 wrong; row 3 has no audio


def test_build_evaluators_rejects_unknown_names_and_options():
  with pytest.raises(ValueError, match="captioning"):
    tasks.build_evaluators({"captioning": {}})
  with pytest.raises(ValueError, match="evals.vqa"):
    tasks.build_evaluators({"vqa": {"top_k": 5}})
  with pytest.raises(ValueError, match="smell"):
    tasks.build_evaluators({"retrieval": {"pairs": [("image", "smell")]}})
