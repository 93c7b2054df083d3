"""Tokenizers of pretrained towers, from their files: CLIP's BPE (open_clip / OpenAI / HF merges) and SigLIP's
SentencePiece. Each has the surface `encode(texts) -> int32[N, max_len]`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `max_len`; `from_spec` rebuilds one from the spec a converted checkpoint's config carries."""

import pathlib
import string
from typing import Any, Sequence

import numpy as np

from crucible_jax.data.tokenizers import clip_bpe

CLIP_BPE, SENTENCEPIECE = "clip_bpe", "sentencepiece"


class ClipBpeTokenizer:
  """open_clip's `tokenize` over a batch: <start_of_text> BPE <end_of_text>, zero-padded, truncated to end in EOT."""

  def __init__(self, merges_file: str | pathlib.Path, max_len: int = 77):
    self._bpe = clip_bpe.ClipBpeTokenizer(merges_file, max_len)
    self.vocab_size, self.max_len, self.pad_id = self._bpe.vocab_size, max_len, self._bpe.pad_id
    self.bos_id, self.eos_id = self._bpe.bos_id, self._bpe.eos_id

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32[N, max_len]: <start_of_text> ids <end_of_text>, zero-padded; too long keeps its head and ends in EOT."""
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self._bpe.ids(text), self.eos_id][: self.max_len]
      ids[-1] = self.eos_id
      out[row, : len(ids)] = ids
    return out


def canonicalize(text: str) -> str:
  """SigLIP's text as big_vision and HF SiglipTokenizer see it: lower case, no ASCII punctuation, single spaces."""
  return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


class SentencePieceTokenizer:
  """SigLIP's text side: canonicalized text as SentencePiece pieces, then </s>, padded with </s> to `max_len`."""

  def __init__(self, model_file: str | pathlib.Path, max_len: int = 64, canonical: bool = True):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    self.vocab_size, self.max_len, self.canonical = self._sp.get_piece_size(), max_len, canonical
    self.eos_id, self.bos_id = self._sp.eos_id(), self._sp.bos_id()
    self.pad_id = self.eos_id  # SigLIP pads with </s>

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32[N, max_len]: pieces + </s>, truncated (keeping </s>) and padded."""
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [*self._sp.encode(canonicalize(text) if self.canonical else text), self.eos_id][: self.max_len]
      ids[-1] = self.eos_id
      out[row, : len(ids)] = ids
    return out


def from_spec(spec: Any, root: str | pathlib.Path) -> ClipBpeTokenizer | SentencePieceTokenizer:
  """The tokenizer a converted checkpoint's `pretrained.tokenizer` spec names; its file is relative to `root`."""
  path = pathlib.Path(root) / spec["file"]
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file {path} (pretrained.tokenizer.file) not found")
  if spec["kind"] == CLIP_BPE:
    return ClipBpeTokenizer(path, spec["max_len"])
  if spec["kind"] == SENTENCEPIECE:
    return SentencePieceTokenizer(path, spec["max_len"], spec.get("canonical", True))
  raise ValueError(f"pretrained.tokenizer.kind={spec['kind']!r}: expected {CLIP_BPE} or {SENTENCEPIECE}")
