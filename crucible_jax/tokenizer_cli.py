"""`crucible tokenizer train --manifest PATH --vocab-size N --out F.model`: a SentencePiece model of the captions."""

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
  """The `tokenizer` subcommand's arguments."""
  p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on a collection's captions")
  actions = p.add_subparsers(dest="action", required=True)
  train = actions.add_parser("train", help="train a SentencePiece model offline on the captions of a collection")
  source = train.add_mutually_exclusive_group(required=True)
  source.add_argument("--manifest", help="a .jsonl/.csv manifest (experiments/own_data.py layout)")
  source.add_argument("--shards", help="WebDataset shards, a glob such as 'DIR/*.tar'")
  train.add_argument("--vocab-size", type=int, required=True,
                     help="most pieces in the vocabulary, specials included (fewer if the captions hold fewer)")
  train.add_argument("--out", required=True, help="where to write the .model file")
  train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"), help="SentencePiece algorithm")
  train.add_argument("--byte-fallback", action="store_true",
                     help="unseen characters become byte pieces (adds 256 pieces; --vocab-size must exceed 260)")


def run(args: argparse.Namespace, config: Any) -> int:
  """Train and write the model; then use it with --config.data.tokenizer.kind=sentencepiece and .path=OUT."""
  del config
  from crucible_jax.data.own import records  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  from crucible_jax.data.own.config import own_data_config  # pylint: disable=g-import-not-at-top
  from crucible_jax.data.tokenizers import spiece  # pylint: disable=g-import-not-at-top

  data = own_data_config()
  data.manifest, data.shards = args.manifest, args.shards
  try:
    rows = [row for _, _, row in records.entries(data, held_out=False) if isinstance(row, records.Row)]
    tokenizer = spiece.train((t for row in rows for t in row.texts), args.vocab_size, args.out,
                             model_type=args.model_type, byte_fallback=args.byte_fallback)
  except (ValueError, FileNotFoundError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {tokenizer.vocab_size} pieces from the captions of {len(rows)} records; use "
        f"--config.data.tokenizer.kind=sentencepiece --config.data.tokenizer.path={args.out}")
  return 0
