"""`crucible retrieval`: image–caption R@1/5/10 on a Karpathy split of COCO or Flickr30k (5 captions per image)."""

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np


def add_parser(sub: Any) -> None:
  """The `retrieval` subcommand's arguments."""
  p = sub.add_parser("retrieval", help="image-text retrieval R@K on a Karpathy split (dataset_coco.json, ...)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--params", help="params directory (crucible convert's --out)")
  source.add_argument("--workdir", help="a crucible train workdir (its newest checkpoint)")
  p.add_argument("--karpathy", required=True, help="dataset_coco.json or dataset_flickr30k.json")
  p.add_argument("--images", required=True, help="image root: IMAGES/filepath/filename (COCO) or IMAGES/filename")
  p.add_argument("--split", default="test", help="Karpathy split (default test)")
  p.add_argument("--captions-per-image", type=int, default=5, help="first N captions of each image; 0: all")
  p.add_argument("--batch", type=int, default=256, help="embedding batch size")
  p.add_argument("--json", required=True, help="output: {split/<dataset>_<direction>/R@k: recall}")


def evaluate(model: Any, root: pathlib.Path, split: Any, batch: int) -> dict[str, float]:
  """R@1/5/10 both ways of a loaded model on a `KarpathySplit`, keys `<dataset>_<direction>/R@k`."""
  from crucible_jax import embed  # pylint: disable=g-import-not-at-top
  from crucible_jax.eval.karpathy import retrieval_recalls  # pylint: disable=g-import-not-at-top
  from crucible_jax.eval.zero_shot import chunks, embed_in_chunks  # pylint: disable=g-import-not-at-top
  lacking = [m for m in ("image", "text") if m not in model.modalities]
  if lacking:
    raise ValueError(f"this model has no {lacking[0]!r} encoder; it encodes {model.modalities}")
  images = np.concatenate([model.embed("image", embed.image_inputs(model, split.images[part]))
                           for part in chunks(len(split.images), batch)])
  texts = embed_in_chunks(lambda x: model.embed("text", x), embed.text_inputs(model, root, split.captions),
                          batch)
  scores = retrieval_recalls(images, texts, split.caption_image)
  return {f"{split.dataset}_{key}": value for key, value in scores.items()} | {
      f"{split.dataset}/images": float(len(split.images)), f"{split.dataset}/captions": float(len(split.captions))}


def run(args: argparse.Namespace, config: Any) -> int:
  """Load the model, score the split, write --json; exit 1 with one line naming a bad input."""
  del config
  from crucible_jax import inference  # pylint: disable=g-import-not-at-top  (jax: keep --help fast)
  from crucible_jax.data.formats.karpathy import read_karpathy  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(args.params or args.workdir)
  try:  # the split is read (and every image checked) before the model loads
    if args.captions_per_image < 0:
      raise ValueError(f"--captions-per-image must be >= 0, got {args.captions_per_image}")
    split = read_karpathy(args.karpathy, args.images, args.split, args.captions_per_image or None)
    scores = evaluate(inference.load(root), root, split, args.batch)
    result = {f"{args.split}/{key}": value for key, value in scores.items()}
  except (ValueError, FileNotFoundError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, sort_keys=True))
  print(json.dumps(result, indent=1, sort_keys=True))
  return 0
