"""`crucible embed`: normalised joint-space embeddings of image files, strings and WAVs, as JSON.

A converted checkpoint (`crucible convert`) preprocesses and tokenizes as its source framework does, so the same
files give that framework's embeddings; a crucible run uses its own data config (byte tokens, resized pixels).
"""

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

import numpy as np


def add_parser(sub: Any) -> None:
  """The `embed` subcommand's arguments."""
  p = sub.add_parser("embed", help="embed images, texts and audio with a params directory or trained run")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--params", help="params directory (crucible convert's --out)")
  source.add_argument("--workdir", help="a crucible train workdir (its newest checkpoint)")
  p.add_argument("--images", nargs="+", default=[], help="image files")
  p.add_argument("--texts", nargs="+", default=[], help="strings")
  p.add_argument("--audio", nargs="+", default=[], help="WAV files")
  p.add_argument("--json", required=True, help="output: {modality: [[float, ...], ...]} in input order")


def _native_image(path: str, size: tuple[int, int], channels: int) -> np.ndarray:
  """A crucible model's image input: grey or RGB, resized (bilinear) to `size`, in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(path).convert("L" if channels == 1 else "RGB").resize(size[::-1], Image.BILINEAR)
  return np.asarray(image, np.float32).reshape(*size, channels) / 255.0


def image_inputs(model: Any, paths: Sequence[str]) -> dict[str, np.ndarray]:
  """Image files as the model's image batch keys: a converted checkpoint's preprocessing, else the run's size."""
  pretrained = model.config.get("pretrained")
  if pretrained is not None:
    from crucible_jax.interop.preprocess import load_image  # pylint: disable=g-import-not-at-top
    pixels = [load_image(p, pretrained.preprocess) for p in paths]
  else:
    data = model.config.data
    pixels = [_native_image(p, tuple(data.image_size), int(data.get("channels", 1))) for p in paths]
  return {"image": np.stack(pixels)}


def text_inputs(model: Any, root: pathlib.Path, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """Strings as token ids: a converted checkpoint's tokenizer (files under `root`), else the run's."""
  pretrained = model.config.get("pretrained")
  if pretrained is not None:
    from crucible_jax.interop.tokenizers import from_spec  # pylint: disable=g-import-not-at-top
    return {"text": from_spec(pretrained.tokenizer, root).encode(list(texts))}
  from crucible_jax.data.tokenizers import tokenizer_of  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_of(model.config.data)
  return {"text": np.stack([tokenizer.encode(t) for t in texts])}


def audio_inputs(model: Any, paths: Sequence[str]) -> dict[str, np.ndarray]:
  """WAV files as the model's audio batch keys (resampled, cut or padded to the run's length)."""
  from crucible_jax.generate import read_audio  # pylint: disable=g-import-not-at-top
  waves, lengths = zip(*(read_audio(p, model.config.data) for p in paths))
  return {"audio": np.stack(waves), "audio_len": np.asarray(lengths, np.int32)}


def _inputs(model: Any, root: pathlib.Path, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
  """Each requested modality's batch keys, read and preprocessed in input order."""
  out = {}
  if args.images:
    out["image"] = image_inputs(model, args.images)
  if args.texts:
    out["text"] = text_inputs(model, root, args.texts)
  if args.audio:
    out["audio"] = audio_inputs(model, args.audio)
  return out


def run(args: argparse.Namespace, config: Any) -> int:
  """Load the model, embed every input, write --json; exit 1 with one line naming a bad input."""
  del config
  if not (args.images or args.texts or args.audio):
    print("crucible: error: nothing to embed: give --images, --texts and/or --audio", file=sys.stderr)
    return 2
  missing = [p for p in (*args.images, *args.audio) if not pathlib.Path(p).is_file()]
  if missing:
    print(f"crucible: error: input file not found: {missing[0]}", file=sys.stderr)
    return 1
  from crucible_jax import inference  # pylint: disable=g-import-not-at-top  (jax: keep --help fast)
  root = pathlib.Path(args.params or args.workdir)
  try:
    model = inference.load(root)
    asked = {"image": args.images, "text": args.texts, "audio": args.audio}
    lacking = [m for m, given in asked.items() if given and m not in model.modalities]
    if lacking:
      raise ValueError(f"this model has no {lacking[0]!r} encoder; it encodes {model.modalities}")
    result = {m: model.embed(m, inputs).tolist() for m, inputs in _inputs(model, root, args).items()}
  except (ValueError, FileNotFoundError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result))
  print(out)
  return 0
