"""Byte-level tokenizer: any language (English and Chinese captions alike) with no trained vocabulary."""

from typing import Final, Sequence

import numpy as np

PAD: Final = 0
BYTE_OFFSET: Final = 1  # byte b is token b + 1
BOS: Final = 257
EOS: Final = 258
VOCAB_SIZE: Final = 259


def encode(text: str, max_len: int, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 tokens, padded with PAD to `max_len`; ValueError if it does not fit."""
  ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
  if add_bos:
    ids = [BOS] + ids
  if add_eos:
    ids = ids + [EOS]
  if not text.strip():
    raise ValueError("cannot tokenize an empty text")
  if len(ids) > max_len:
    raise ValueError(f"text {text!r} needs {len(ids)} tokens, more than max_len={max_len}")
  out = np.full((max_len,), PAD, np.int32)
  out[: len(ids)] = ids
  return out


def decode(ids: Sequence[int] | np.ndarray) -> str:
  """Inverse of `encode`: stops at EOS, drops PAD/BOS, replaces invalid UTF-8."""
  data = bytearray()
  for token in np.asarray(ids).tolist():
    if token == EOS:
      break
    if BYTE_OFFSET <= token < BOS:
      data.append(token - BYTE_OFFSET)
  return data.decode("utf-8", errors="replace")
