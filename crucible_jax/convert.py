"""`crucible convert`: a pretrained open_clip / Hugging Face CLIP / SigLIP checkpoint → a crucible params directory.

The directory (`config.json`, `params/`, `tokenizer/`) loads with `inference.load`, embeds with `crucible embed`
and fine-tunes like any run; its config carries the architecture, the image preprocessing and the tokenizer.
"""

import argparse
import sys
from typing import Any

from crucible_jax.interop.archs import ARCHS, SOURCES


def add_parser(sub: Any) -> None:
  """The `convert` subcommand's arguments."""
  p = sub.add_parser("convert", help="convert a pretrained CLIP/SigLIP checkpoint into a crucible params directory")
  p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the checkpoint's framework")
  p.add_argument("--checkpoint", required=True, help=".safetensors, .bin/.pt (needs torch) or .npz state dict")
  p.add_argument("--out", required=True, help="new (or empty) output directory")
  p.add_argument("--arch", help=f"open_clip architecture name: {', '.join(ARCHS)} (suffix -quickgelu for "
                                "OpenAI-trained weights); default: read off the checkpoint")
  p.add_argument("--tokenizer", help="BPE merges (.txt.gz / merges.txt) or SentencePiece model; default: beside the "
                                     "checkpoint, else open_clip's packaged vocabulary")
  p.add_argument("--hf-config", help="Hugging Face config.json (default: beside the checkpoint)")


def run(args: argparse.Namespace, config: Any) -> int:
  """Convert and print the output directory; exit 1 with one line naming the problem on a bad input."""
  del config
  from crucible_jax.interop.convert import convert  # pylint: disable=g-import-not-at-top  (jax: keep --help fast)
  try:
    out = convert(args.source, args.checkpoint, args.out, args.arch, args.tokenizer, args.hf_config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  print(out)
  return 0
