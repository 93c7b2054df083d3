"""Tokenizers of pretrained towers, from their files: CLIP's BPE (open_clip / OpenAI / HF merges) and SigLIP's
SentencePiece. Each has the surface `encode(texts) -> int32[N, max_len]`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `max_len`; `from_spec` rebuilds one from the spec a converted checkpoint's config carries."""

import functools
import gzip
import html
import pathlib
import string
from typing import Any, Sequence

import numpy as np

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, merges, <start/end_of_text>
CLIP_BPE, SENTENCEPIECE = "clip_bpe", "sentencepiece"


@functools.lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte → printable-character table."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  codes, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, codes)))


def _read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
  """Merges of open_clip's `bpe_simple_vocab_16e6.txt.gz` or HF's `merges.txt` (both: a header line, then pairs)."""
  raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
  lines = raw.decode("utf-8").split("\n")[1:NUM_MERGES + 1]
  merges = [tuple(line.split()) for line in lines]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path} is not a CLIP BPE merges file ({NUM_MERGES} pairs after a header line)")
  return merges


def _clean(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy (when installed), HTML unescape twice, collapsed whitespace, lower case."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top  (optional, as in OpenAI's tokenizer: fixes mojibake)
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  return " ".join(html.unescape(html.unescape(text)).strip().split()).lower()


class ClipBpeTokenizer:
  """open_clip's SimpleTokenizer: <start_of_text> BPE <end_of_text>, zero-padded, truncated to end in EOT."""

  def __init__(self, merges_file: str | pathlib.Path, max_len: int = 77):
    import regex  # pylint: disable=g-import-not-at-top  (\p{L} classes; the stdlib `re` has none)
    merges = _read_merges(pathlib.Path(merges_file))
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    specials = ["<start_of_text>", "<end_of_text>"]
    self._ids = {token: i for i, token in enumerate(vocab + specials)}
    self._ranks = {m: i for i, m in enumerate(merges)}
    words = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    self._pattern = regex.compile("|".join(specials) + words, regex.IGNORECASE)
    self._cache = {t: t for t in specials}
    self.vocab_size, self.max_len, self.pad_id = len(self._ids), max_len, 0
    self.bos_id, self.eos_id = self._ids[specials[0]], self._ids[specials[1]]

  def _bpe(self, token: str) -> str:
    if token in self._cache:
      return self._cache[token]
    word = (*token[:-1], token[-1] + "</w>")
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[token] = " ".join(word)
    return self._cache[token]

  def ids(self, text: str) -> list[int]:
    """BPE ids of one string, without <start/end_of_text>."""
    table, out = _bytes_to_unicode(), []
    for token in self._pattern.findall(_clean(text)):
      out += [self._ids[t] for t in self._bpe("".join(table[b] for b in token.encode("utf-8"))).split(" ")]
    return out

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32[N, max_len]: <start_of_text> ids <end_of_text>, zero-padded; too long keeps its head and ends in EOT."""
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self.ids(text), self.eos_id][: self.max_len]
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
