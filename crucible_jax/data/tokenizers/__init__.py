"""Tokenizers behind one interface; `data.tokenizer` picks one and everything text-sized follows it.

`model.text.{vocab_size, pad_id, bos_id, eos_id}` are set from the configured tokenizer when a config loads
(config.py), so encoders, decoders, the router and the loaders agree on them.
"""

import functools
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from crucible_jax.data.tokenizers.base import Tokenizer
from crucible_jax.data.tokenizers.byte import ByteTokenizer

KINDS = ("byte", "sentencepiece", "hf", "clip_bpe")


def _sentencepiece(path: str, max_len: int) -> Tokenizer:
  from crucible_jax.data.tokenizers.spiece import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
  return SentencePieceTokenizer(path, max_len)


def _hf(path: str, max_len: int) -> Tokenizer:
  from crucible_jax.data.tokenizers.hf import HFTokenizer  # pylint: disable=g-import-not-at-top
  return HFTokenizer(path, max_len)


def _clip_bpe(path: str, max_len: int) -> Tokenizer:
  from crucible_jax.data.tokenizers.clip_bpe import ClipBpeTokenizer  # pylint: disable=g-import-not-at-top
  return ClipBpeTokenizer(path, max_len)


_FILE_TOKENIZERS: dict[str, Callable[[str, int], Tokenizer]] = {"sentencepiece": _sentencepiece, "hf": _hf,
                                                                "clip_bpe": _clip_bpe}


def default_tokenizer_config() -> ml_collections.ConfigDict:
  """`data.tokenizer`: the byte tokenizer unless a kind and a file are given."""
  cfg = ml_collections.ConfigDict()
  cfg.kind = "byte"  # byte | sentencepiece (a .model) | hf (a tokenizer.json) | clip_bpe (CLIP's merges file)
  cfg.path = config_dict.placeholder(str)  # the model file of sentencepiece / hf, the merges file of clip_bpe
  return cfg


@functools.lru_cache(maxsize=16)
def build_tokenizer(kind: str, path: str | None, max_len: int) -> Tokenizer:
  """Tokenizer `kind` (from `path`) padding to `max_len`, loaded once per process; ValueError naming the field."""
  if kind == "byte":
    return ByteTokenizer(max_len)
  if kind not in _FILE_TOKENIZERS:
    raise ValueError(f"data.tokenizer.kind={kind!r}; choose from {KINDS}")
  if not path:
    raise ValueError(f"data.tokenizer.kind={kind!r} needs data.tokenizer.path (the model file)")
  return _FILE_TOKENIZERS[kind](path, max_len)


def tokenizer_of(data_cfg: Any, field: str = "text_len") -> Tokenizer:
  """The tokenizer of a data config (ConfigDict or namespace; none = byte), padding to its `field` length."""
  spec = getattr(data_cfg, "tokenizer", None)
  kind, path = (spec["kind"], spec.get("path")) if spec else ("byte", None)
  return build_tokenizer(kind, path, int(getattr(data_cfg, field)))


__all__ = ["KINDS", "ByteTokenizer", "Tokenizer", "build_tokenizer", "default_tokenizer_config", "tokenizer_of"]
