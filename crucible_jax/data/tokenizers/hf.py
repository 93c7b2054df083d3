"""Hugging Face `tokenizers` (a `tokenizer.json`, e.g. a BPE); special tokens found by their usual names."""

import os
from typing import Any, Sequence

import numpy as np
import tokenizers

from crucible_jax.data.tokenizers.base import Tokenizer

SPECIAL_NAMES = {  # role -> token strings tried in order
    "pad": ("<pad>", "[PAD]", "<|pad|>"),  # optional: without one, ids shift by one and 0 pads
    "bos": ("<s>", "<bos>", "[CLS]", "<|startoftext|>"),
    "eos": ("</s>", "<eos>", "[SEP]", "<|endoftext|>"),
}


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` from `tokenizer.json`; bos/eos (and pad, if any) are its tokens in SPECIAL_NAMES."""

  def __init__(self, path: str, max_len: int):
    super().__init__(max_len)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
      raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {error}") from error
    found = {}
    for role, names in SPECIAL_NAMES.items():
      ids = [self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None]
      if not ids and role != "pad":
        raise ValueError(f"{path}: no {role} token; expected one of {names}")
      found[role] = ids[0] if ids else None
    self.offset = 0 if found["pad"] == 0 else 1
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True) + self.offset
    self.bos_id, self.eos_id = found["bos"] + self.offset, found["eos"] + self.offset

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_tok": self._tok.to_str()}

  def __setstate__(self, state: dict[str, Any]) -> None:
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    self._tok = tokenizers.Tokenizer.from_str(state["_tok"])

  def ids(self, text: str) -> list[int]:
    return [i + self.offset for i in self._tok.encode(text, add_special_tokens=False).ids]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([t - self.offset for t in self._kept(ids) if t >= self.offset])
