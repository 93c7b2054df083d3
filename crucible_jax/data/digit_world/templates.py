"""DigitWorld's words: captions (English, Chinese, numerals), VQA questions and the closed answer vocabulary."""

import re
from typing import Final, Sequence

import numpy as np

ENGLISH_WORDS: Final = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHINESE_WORDS: Final = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")

# Caption templates; the fields are filled by `caption`. None of them names a digit except through the fields.
CAPTION_TEMPLATES: Final = (
    "{en}",  # three seven one
    "the number {num}",  # the number 371
    "{num}",  # 371
    "digits: {en}",  # digits: three seven one
    "a card showing {num}",
    "数字{zh}",  # 数字三七一
    "{zh}",  # 三七一
    "号码是{num}",  # 号码是371
    "这张卡片写着{zh}",  # this card says 三七一
)

QUESTION_TYPES: Final = ("count", "nth_digit", "sum", "parity", "contains")
ANSWERS: Final = tuple(str(i) for i in range(37)) + ("yes", "no", "odd", "even")
_ANSWER_INDEX: Final = {answer: i for i, answer in enumerate(ANSWERS)}
_ORDINALS: Final = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def string_id(digits: Sequence[int]) -> int:
  """Unique int per digit string, "07" != "7": strings of length n follow the 10 + ... + 10^(n-1) shorter ones."""
  if not digits:
    raise ValueError("a digit string needs at least one digit")
  shorter = sum(10**length for length in range(1, len(digits)))
  return shorter + int("".join(str(d) for d in digits))


def english(digits: Sequence[int]) -> str:
  """A digit string in English words, padding (-1) dropped: [3, 7, 1] -> "three seven one"."""
  return " ".join(ENGLISH_WORDS[int(d)] for d in digits if int(d) >= 0)


def caption(digits: Sequence[int], template_id: int) -> str:
  """The caption of `digits` in template `template_id` (index into CAPTION_TEMPLATES)."""
  if not 0 <= template_id < len(CAPTION_TEMPLATES):
    raise ValueError(f"caption template id {template_id} outside [0, {len(CAPTION_TEMPLATES)})")
  return CAPTION_TEMPLATES[template_id].format(
      en=english(digits),
      zh="".join(CHINESE_WORDS[d] for d in digits),
      num="".join(str(d) for d in digits),
  )


_DIGIT_PATTERN: Final = re.compile(
    "|".join([r"\b(?:" + "|".join(ENGLISH_WORDS) + r")\b", "[0-9]", "[" + "".join(CHINESE_WORDS) + "]"])
)


def parse_digits(text: str) -> list[int]:
  """Digits a caption names, in order, whether as English words, Chinese numerals or Arabic numerals."""
  lookup = {w: i for i, w in enumerate(ENGLISH_WORDS)} | {w: i for i, w in enumerate(CHINESE_WORDS)}
  return [lookup[m] if m in lookup else int(m) for m in _DIGIT_PATTERN.findall(text)]


def draw_question(digits: Sequence[int], rng: np.random.Generator) -> tuple[int, int]:
  """A random (question_type, param) about `digits`; `contains` asks for one of its digits half the time (balanced)."""
  question_type = int(rng.integers(len(QUESTION_TYPES)))
  kind = QUESTION_TYPES[question_type]
  if kind == "nth_digit":
    param = int(rng.integers(len(digits)))
  elif kind == "contains":
    param = int(rng.choice(digits)) if rng.random() < 0.5 else int(rng.integers(10))
  else:
    param = 0
  return question_type, param


def question(question_type: int, param: int) -> str:
  """English question text; `param` is the 0-based position (nth_digit) or the digit asked about (contains)."""
  kind = QUESTION_TYPES[question_type]
  if kind == "count":
    return "how many digits are there?"
  if kind == "nth_digit":
    return f"what is the {_ORDINALS[param]} digit?"
  if kind == "sum":
    return "what is the sum of the digits?"
  if kind == "parity":
    return "is the sum odd or even?"
  return f"is there a {param}?"


def answer(digits: Sequence[int], question_type: int, param: int) -> int:
  """Index in ANSWERS of the correct answer to (question_type, param) about `digits`."""
  kind = QUESTION_TYPES[question_type]
  if kind == "count":
    text = str(len(digits))
  elif kind == "nth_digit":
    if not 0 <= param < len(digits):
      raise ValueError(f"nth_digit question asks for position {param} of a {len(digits)}-digit string")
    text = str(digits[param])
  elif kind == "sum":
    text = str(sum(digits))
  elif kind == "parity":
    text = "odd" if sum(digits) % 2 else "even"
  else:
    text = "yes" if param in digits else "no"
  return _ANSWER_INDEX[text]
