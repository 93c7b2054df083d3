"""The tokenizer interface every text path (loaders, encoders, decoders, router) reads its ids and sizes from."""

import abc
from typing import Sequence

import numpy as np


class Tokenizer(abc.ABC):
  """Text <-> int32 ids, padded with `pad_id` = 0 to `max_len` (the batch schema's padding); ids < `vocab_size`.

  A model file whose own ids give 0 to a real token is shifted by one (`offset`), so 0 always means padding; the
  exception is `clip_bpe`, which keeps open_clip's ids (0 = "!") so converted CLIP towers read them unchanged, and
  is only accepted with a text tower that masks causally, not by padding.
  """

  vocab_size: int
  pad_id: int = 0
  bos_id: int
  eos_id: int

  def __init__(self, max_len: int):
    if max_len <= 0:
      raise ValueError(f"tokenizer max_len={max_len} must be positive")
    self.max_len = int(max_len)

  @abc.abstractmethod
  def ids(self, text: str) -> list[int]:
    """The ids of `text`, no specials, no padding."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`: stops at EOS, drops padding and BOS."""

  def fit(self, text: str, max_len: int | None = None, *, add_bos: bool = False,
          add_eos: bool = False) -> tuple[np.ndarray, bool]:
    """(`encode` of `text` cut to fit `max_len`, whether it was cut); ValueError for an empty text."""
    max_len = self.max_len if max_len is None else max_len
    if not text.strip():
      raise ValueError("cannot tokenize an empty text")
    ids = ([self.bos_id] if add_bos else []) + self.ids(text)
    room = max_len - int(add_eos)
    truncated = len(ids) > room
    ids = ids[:room] + ([self.eos_id] if add_eos else [])
    out = np.full((max_len,), self.pad_id, np.int32)
    out[: len(ids)] = ids
    return out, truncated

  def encode(self, text: str, max_len: int | None = None, *, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    """Ids of `text` padded with `pad_id` to `max_len`; ValueError if empty or if it does not fit."""
    tokens, truncated = self.fit(text, max_len, add_bos=add_bos, add_eos=add_eos)
    if truncated:
      need = len(self.ids(text)) + int(add_bos) + int(add_eos)
      raise ValueError(f"text {text!r} needs {need} tokens, more than max_len={len(tokens)}")
    return tokens

  def _kept(self, ids: Sequence[int] | np.ndarray) -> list[int]:
    """`ids` up to the first EOS, without padding and BOS."""
    kept = []
    for token in np.asarray(ids).tolist():
      if token == self.eos_id:
        break
      if token not in (self.pad_id, self.bos_id):
        kept.append(token)
    return kept
