"""Byte-level tokenizer: any language (English and Chinese captions alike) with no trained vocabulary."""

from typing import Final, Sequence

import numpy as np

from crucible_jax.data.tokenizers.base import Tokenizer

PAD: Final = 0
BYTE_OFFSET: Final = 1  # byte b is token b + 1
BOS: Final = 257
EOS: Final = 258
VOCAB_SIZE: Final = 259


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted by one (0 is padding), BOS 257, EOS 258; cuts keep whole characters."""

  vocab_size, pad_id, bos_id, eos_id = VOCAB_SIZE, PAD, BOS, EOS

  def ids(self, text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]

  def fit(self, text: str, max_len: int | None = None, *, add_bos: bool = False,
          add_eos: bool = False) -> tuple[np.ndarray, bool]:
    max_len = self.max_len if max_len is None else max_len
    data = text.encode("utf-8")
    room = max_len - int(add_bos) - int(add_eos)
    if len(data) > room:  # cut at a character boundary, not inside a multi-byte character
      text = data[:max(room, 0)].decode("utf-8", errors="ignore")
      return super().fit(text, max_len, add_bos=add_bos, add_eos=add_eos)[0], True
    return super().fit(text, max_len, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    data = bytes(t - BYTE_OFFSET for t in self._kept(ids) if BYTE_OFFSET <= t < BOS)
    return data.decode("utf-8", errors="replace")
