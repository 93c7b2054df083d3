"""VQA v2 (official layout) with a closed answer vocabulary and the 10 human answers for soft accuracy.

Layout under `root`:
  v2_OpenEnded_mscoco_{split}_questions.json   {"questions": [{"image_id", "question", "question_id"}]}
  v2_mscoco_{split}_annotations.json           {"annotations": [{"question_id", "multiple_choice_answer",
                                                 "answers": [{"answer", ...} x 10], "answer_type"}]}
  {split}/COCO_{split}_{image_id:012d}.jpg     the COCO images
"""

import collections
import json
import os
from typing import Any, Sequence

import numpy as np

from crucible_jax.data.formats import common

ANSWER_TYPES = ("yes/no", "number", "other")  # `question_type` index = position here
UNKNOWN_ANSWER = -1  # `answer` of a kept out-of-vocabulary question (unknown_answer="keep")


def normalize_answer(answer: str) -> str:
  """Case- and space-insensitive key used to match answers against the vocabulary."""
  return " ".join(answer.lower().split())


def _read_list(path: str, key: str) -> list:
  """The top-level list `key` of a JSON file; ValueError naming the file if absent or invalid."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON: {err}") from err
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise ValueError(f"{path}: needs a top-level '{key}' list")
  return data[key]


def build_answer_vocab(annotations_file: str, top_k: int = 3129) -> list[str]:
  """The `top_k` most frequent (normalized) multiple-choice answers of an annotations file; ties by name."""
  common.require_file(annotations_file, "VQA annotations")
  counts = collections.Counter(
      normalize_answer(a["multiple_choice_answer"])
      for a in _read_list(annotations_file, "annotations")
      if isinstance(a, dict) and isinstance(a.get("multiple_choice_answer"), str))
  return [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


class VqaV2(common.RecordSource):
  """One sample per question: image, question tokens, answer index, answer type; `string_id` = question_id.

  Vocabulary: `answer_vocab` if given, else the `top_k` answers of `{train_split}`'s annotations in `root`
  (keep `source.answer_vocab` to reuse it for every split). An answer outside it follows `unknown_answer`:
  "error" (a bad record: raises, or is skipped with `skip_bad_records`), "skip" (always dropped, counted), or
  "keep" (answer = -1; use for evaluation so such questions count as wrong; losses must mask answer < 0).
  """

  def __init__(self, root: str, split: str = "val2014", *, answer_vocab: Sequence[str] | None = None,
               top_k: int = 3129, train_split: str = "train2014", unknown_answer: str = "error",
               image_size: int | Sequence[int] = 224, channels: int = 3, question_len: int = 64,
               skip_bad_records: bool = False, tokenizer: common.Tokenizer | None = None):
    super().__init__(skip_bad_records)
    self.tokenizer = tokenizer  # None: byte tokens
    common.check_choice("unknown_answer", unknown_answer, ("error", "skip", "keep"))
    common.check_choice("channels", channels, (1, 3))
    common.check_positive(question_len=question_len, top_k=top_k)
    self.split, self.channels, self.question_len = split, channels, question_len
    self.unknown_answer = unknown_answer
    self.image_size = common.image_hw(image_size)
    common.require_dir(root, "VQA root")
    self.image_dir = common.require_dir(os.path.join(root, split), f"VQA {split} images")
    self.question_file = common.require_file(
        os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json"), "VQA questions")
    self.annotation_file = common.require_file(
        os.path.join(root, f"v2_mscoco_{split}_annotations.json"), "VQA annotations")
    if answer_vocab is None:
      answer_vocab = build_answer_vocab(os.path.join(root, f"v2_mscoco_{train_split}_annotations.json"), top_k)
    self.answer_vocab = [normalize_answer(a) for a in answer_vocab]
    if len(set(self.answer_vocab)) != len(self.answer_vocab):
      raise ValueError("answer_vocab has duplicate answers (after normalize_answer)")
    self._answer_index = {a: k for k, a in enumerate(self.answer_vocab)}

    annotations: dict[int, dict[str, Any]] = {}
    for n, entry in enumerate(_read_list(self.annotation_file, "annotations")):
      try:
        annotations.update(self._parse_annotation(n, entry))
      except common.BadRecord as err:
        self._reject(err)
    for n, entry in enumerate(_read_list(self.question_file, "questions")):
      try:
        parsed = self._parse_question(n, entry, annotations)
      except common.BadRecord as err:
        self._reject(err)
        continue
      if parsed is not None:
        self.records.append(parsed)
    self._by_question_id = {r["question_id"]: k for k, r in enumerate(self.records)}
    self._finish(self.question_file)

  def _parse_annotation(self, n: int, entry: Any) -> dict[int, dict[str, Any]]:
    record = f"annotations[{n}]"
    common.require_keys(entry, ("question_id", "multiple_choice_answer", "answers", "answer_type"),
                        self.annotation_file, record)
    question_id = common.int32_id(entry["question_id"], self.annotation_file, record)
    answers = entry["answers"]
    if not isinstance(answers, list) or not answers or not all(
        isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
      raise common.BadRecord(self.annotation_file, record, "malformed", "'answers' must list {'answer': str}")
    if entry["answer_type"] not in ANSWER_TYPES:
      raise common.BadRecord(self.annotation_file, record, "unknown_answer_type", repr(entry["answer_type"]))
    return {question_id: {"multiple_choice_answer": str(entry["multiple_choice_answer"]),
                          "answers": [a["answer"] for a in answers],
                          "answer_type": ANSWER_TYPES.index(entry["answer_type"])}}

  def _parse_question(self, n: int, entry: Any, annotations: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The record of questions[n], None if dropped by the unknown-answer policy, or BadRecord."""
    record = f"questions[{n}]"
    common.require_keys(entry, ("image_id", "question", "question_id"), self.question_file, record)
    question_id = common.int32_id(entry["question_id"], self.question_file, record)
    image_id = common.int32_id(entry["image_id"], self.question_file, record)
    record = f"question_id {question_id}"
    if not isinstance(entry["question"], str) or not entry["question"].strip():
      raise common.BadRecord(self.question_file, record, "empty_question")
    if question_id not in annotations:
      raise common.BadRecord(self.annotation_file, record, "no_annotation")
    annotation = annotations[question_id]
    chosen = annotation["multiple_choice_answer"]
    answer = self._answer_index.get(normalize_answer(chosen), UNKNOWN_ANSWER)
    if answer == UNKNOWN_ANSWER and self.unknown_answer == "skip":
      self.stats["skipped"]["unknown_answer"] += 1
      return None
    if answer == UNKNOWN_ANSWER and self.unknown_answer == "error":
      raise common.BadRecord(self.annotation_file, record, "unknown_answer", repr(chosen))
    path = os.path.join(self.image_dir, f"COCO_{self.split}_{image_id:012d}.jpg")
    if not os.path.isfile(path):
      raise common.BadRecord(path, record, "missing_file")
    return {"question_id": question_id, "image": path, "question": entry["question"].strip(),
            "answer": answer, **annotation}

  def answers(self, index: int) -> list[str]:
    """The raw human answers (10 in VQA v2) of record `index`, for soft accuracy."""
    return list(self.records[index]["answers"])

  def answers_for_question(self, question_id: int) -> list[str]:
    """The raw human answers of a question, looked up by the `string_id` a sample carries."""
    if question_id not in self._by_question_id:
      raise KeyError(f"question_id {question_id} is not in {self.question_file}")
    return self.answers(self._by_question_id[question_id])

  def question(self, index: int) -> str:
    """The question text of record `index`."""
    return self.records[index]["question"]

  def _load(self, index: int) -> common.Sample:
    r = self.records[index]
    image = common.load_image(r["image"], f"question_id {r['question_id']}", self.image_size, self.channels)
    question, truncated = common.fit_text(r["question"], self.question_len, self.tokenizer)
    if truncated:
      self._note_truncated("question", index)
    return {"image": image, "question": question, "answer": np.array(r["answer"], np.int32),
            "question_type": np.array(r["answer_type"], np.int32),
            "string_id": np.array(r["question_id"], np.int32), **common.flags("image")}
