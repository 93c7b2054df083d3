"""SentencePiece tokenizer: load a `.model`, or train one offline on captions (`crucible tokenizer train`)."""

import io
import os
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece

from crucible_jax.data.tokenizers.base import Tokenizer

TRAIN_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)  # ids `train` gives the specials (0 = padding)


def _processor(model: bytes) -> Any:
  return sentencepiece.SentencePieceProcessor(model_proto=model)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model's pieces; it must define eos (bos falls back to padding, as in T5)."""

  def __init__(self, path: str, max_len: int):
    super().__init__(max_len)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path}")
    self.path = path
    with open(path, "rb") as f:
      self._model = f.read()
    try:
      self._sp = _processor(self._model)
    except (RuntimeError, OSError, TypeError) as error:
      raise ValueError(f"{path} is not a SentencePiece model: {error}") from error
    self.offset = 0 if self._sp.pad_id() == 0 else 1
    self.vocab_size = self._sp.GetPieceSize() + self.offset
    if self._sp.eos_id() < 0:
      raise ValueError(f"{path}: the SentencePiece model defines no eos piece (train with `crucible tokenizer "
                       f"train`, which sets {TRAIN_IDS})")
    self.eos_id = self._sp.eos_id() + self.offset
    self.bos_id = self._sp.bos_id() + self.offset if self._sp.bos_id() >= 0 else self.pad_id

  def __getstate__(self) -> dict[str, Any]:  # grain workers get the model bytes, not the C++ processor
    return {k: v for k, v in self.__dict__.items() if k != "_sp"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._sp = _processor(self._model)

  def ids(self, text: str) -> list[int]:
    return [i + self.offset for i in self._sp.EncodeAsIds(text)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.DecodeIds([t - self.offset for t in self._kept(ids) if self.offset <= t < self.vocab_size])


def train(texts: Iterable[str], vocab_size: int, out: str, *, model_type: str = "unigram",
          byte_fallback: bool = False) -> SentencePieceTokenizer:
  """Train a SentencePiece model of at most `vocab_size` pieces on `texts` (fewer when the texts hold fewer),
  write it to `out`, and load it. `byte_fallback`: unseen characters become UTF-8 byte pieces (256 of them)."""
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("no non-empty texts to train a tokenizer on")
  proto = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=byte_fallback, hard_vocab_limit=False, minloglevel=2, **TRAIN_IDS)
  except RuntimeError as error:  # e.g. too few captions for the vocabulary
    raise ValueError(f"SentencePiece training failed: {error}") from error
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(proto.getvalue())
  return SentencePieceTokenizer(out, max_len=64)
