"""CLIP's byte-level BPE (open_clip's SimpleTokenizer) from its merges file: open_clip's `bpe_simple_vocab_16e6.txt.gz`
or Hugging Face's `merges.txt`. Every caption is wrapped in <start_of_text> ... <end_of_text>, as CLIP's text tower
reads it; id 0 ("!") doubles as padding, as in open_clip (CLIP's text tower does not mask it)."""

import functools
import gzip
import html
import pathlib
from typing import Sequence

import numpy as np
import regex

from crucible_jax.data.tokenizers.base import Tokenizer

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, merges, <start/end_of_text>
SPECIALS = ("<start_of_text>", "<end_of_text>")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
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
  """Merges of open_clip's `.txt.gz` or HF's `merges.txt` (both: a header line, then pairs)."""
  if not path.is_file():
    raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
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


class ClipBpeTokenizer(Tokenizer):
  """open_clip's SimpleTokenizer; `fit`/`encode` add <start_of_text>/<end_of_text> unless told not to."""

  def __init__(self, path: str | pathlib.Path, max_len: int = 77):
    super().__init__(max_len)
    self.path = str(path)
    merges = _read_merges(pathlib.Path(path))
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
    self._ids = {token: i for i, token in enumerate(vocab)}
    self._tokens = vocab
    self._ranks = {m: i for i, m in enumerate(merges)}
    words = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    self._pattern = regex.compile("|".join(SPECIALS) + words, regex.IGNORECASE)
    self._cache = {t: t for t in SPECIALS}
    self.vocab_size = len(vocab)
    self.bos_id, self.eos_id = self._ids[SPECIALS[0]], self._ids[SPECIALS[1]]

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
    table, out = bytes_to_unicode(), []
    for token in self._pattern.findall(_clean(text)):
      out += [self._ids[t] for t in self._bpe("".join(table[b] for b in token.encode("utf-8"))).split(" ")]
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    words = "".join(self._tokens[t] for t in self._kept(ids) if t < self.vocab_size).split("</w>")
    return " ".join(bytes(byte_of[c] for c in w).decode("utf-8", errors="replace") for w in words if w)

  def fit(self, text: str, max_len: int | None = None, *, add_bos: bool = True,
          add_eos: bool = True) -> tuple[np.ndarray, bool]:
    return super().fit(text, max_len, add_bos=add_bos, add_eos=add_eos)

  def encode(self, text: str, max_len: int | None = None, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    return super().encode(text, max_len, add_bos=add_bos, add_eos=add_eos)
