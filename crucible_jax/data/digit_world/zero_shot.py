"""DigitWorld's zero-shot classification tasks: class names, prompt templates and labels from a split's digits.

- `digit`: the split's one-digit samples, ten classes named "zero" … "nine" (ImageNet-style: "the number seven").
  Multi-digit samples are left out: a DigitWorld embedding describes the whole string, so asking which single
  digit a "371" card shows has no right answer the model was taught.
- `string`: every sample; the classes are the distinct digit strings of the split ("three seven one"), so top-1
  is a choice among ~2,000 classes, each described only through the templates.

Templates: "{}" and "digits: {}" are caption forms seen in training (with the words filled in); "the number {}"
and "a card showing {}" were only seen with numerals ("the number 371"), so they are new phrasings here.
"""

import dataclasses
from typing import Callable, Final, Sequence

import numpy as np

from crucible_jax.data.digit_world.templates import ENGLISH_WORDS, english, string_id

TEMPLATES: Final = ("{}", "digits: {}", "the number {}", "a card showing {}")


def words(digits: Sequence[int]) -> str:
  """English class name of a digit string, e.g. [3, 7, 1] -> "three seven one"."""
  return english(digits)


@dataclasses.dataclass(frozen=True)
class Labelled:
  """A task's view of a split: class names, and for each kept sample (rows `keep`) its class index."""

  class_names: tuple[str, ...]
  keep: np.ndarray  # [n] bool over the split's samples
  labels: np.ndarray  # [keep.sum()] int class indices


def _strings(digits: np.ndarray, num_digits: np.ndarray) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in row[:n]) for row, n in zip(np.asarray(digits), np.asarray(num_digits))]


def single_digits(digits: np.ndarray, num_digits: np.ndarray) -> Labelled:
  """Task `digit`: the one-digit samples, ten classes."""
  keep = np.asarray(num_digits) == 1
  return Labelled(tuple(ENGLISH_WORDS), keep, np.asarray(digits)[keep, 0].astype(np.int64))


def whole_strings(digits: np.ndarray, num_digits: np.ndarray) -> Labelled:
  """Task `string`: every sample, one class per distinct string of the split (ordered by string id)."""
  strings = _strings(digits, num_digits)
  classes = sorted(set(strings), key=string_id)
  index = {s: i for i, s in enumerate(classes)}
  return Labelled(tuple(words(s) for s in classes), np.ones(len(strings), bool),
                  np.array([index[s] for s in strings], np.int64))


TASKS: Final[dict[str, Callable[[np.ndarray, np.ndarray], Labelled]]] = {
    "digit": single_digits, "string": whole_strings}


def task_of(name: str) -> Callable[[np.ndarray, np.ndarray], Labelled]:
  """The labelling function of task `name`; ValueError listing the tasks."""
  if name not in TASKS:
    raise ValueError(f"unknown DigitWorld zero-shot task {name!r}; choose from {sorted(TASKS)}")
  return TASKS[name]
