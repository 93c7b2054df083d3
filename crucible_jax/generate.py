"""`crucible generate`: convert one input between modalities with a trained converter (caption text or image PNG).

Inputs: `--input` a WAV (audio; resampled to the data rate), a PNG (image; grayscale, strokes bright on dark like
DigitWorld and like this command's own PNGs), a .npy video [F, H, W(, C)] in [0, 1], or a text file; `--text` for
text directly. Text goes to stdout; images to `--output` (default WORKDIR/generated/<from>_to_image.png).
"""

import argparse
import pathlib
import sys
from typing import Any

import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, present_key

TARGETS = ("text", "image")


def add_parser(sub: Any) -> None:
  """The `generate` subcommand's arguments."""
  p = sub.add_parser("generate", help="caption or draw one input with a trained converter (:generate variant)")
  p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
  p.add_argument("--workdir", required=True, help="trained run whose latest checkpoint holds the converter")
  p.add_argument("--from", dest="source", required=True, help=f"input modality: one of {', '.join(MODALITIES)}")
  p.add_argument("--to", dest="target", required=True, help=f"output: one of {', '.join(TARGETS)}")
  p.add_argument("--input", help="input file: WAV (audio), PNG (image), .npy (video) or a text file (text)")
  p.add_argument("--text", help="input text (with --from text), instead of --input")
  p.add_argument("--beam", type=int, default=1, help="caption beam width (1 = greedy)")
  p.add_argument("--output", help="PNG path for --to image")


def _error(message: str, status: int = 2) -> int:
  print(f"crucible: error: {message}", file=sys.stderr)
  return status


def check_args(args: argparse.Namespace) -> tuple[str | None, int]:
  """(None, 0) when the request is well formed, else (message, exit status), before anything heavy loads."""
  if args.source not in MODALITIES:
    return f"--from {args.source!r} is not a modality; choose from {', '.join(MODALITIES)}", 2
  if args.target not in TARGETS:
    return f"--to {args.target!r} is not a generation target; choose from {', '.join(TARGETS)}", 2
  if args.source == TEXT and args.target == "text":
    return "--from text --to text is not a conversion; use --to image", 2
  if args.beam < 1:
    return f"--beam must be at least 1, got {args.beam}", 2
  if args.text is not None and (args.source != TEXT or args.input):
    return "--text goes with --from text and without --input", 2
  if args.text is None and not args.input:
    return f"--from {args.source} needs --input FILE" + (" (or --text)" if args.source == TEXT else ""), 2
  if args.input and not pathlib.Path(args.input).is_file():
    return f"input file not found: {args.input}", 1
  return None, 0


def _image(path: str, size: tuple[int, int]) -> np.ndarray:
  import jax
  import matplotlib.image
  pixels = np.asarray(matplotlib.image.imread(path), np.float32)
  if pixels.max() > 1.0:  # 8-bit PNGs read as integers on some backends
    pixels = pixels / 255.0
  if pixels.ndim == 3:
    pixels = pixels[..., :3].mean(axis=-1)  # RGB(A) -> gray, alpha dropped
  if pixels.shape != tuple(size):
    pixels = np.asarray(jax.image.resize(pixels, tuple(size), "bilinear"))
  return np.clip(pixels, 0.0, 1.0)[..., None]


def read_audio(path: str, data: Any) -> tuple[np.ndarray, int]:
  """A WAV resampled to the data rate, zero-padded or cut to `audio_seconds`, and its valid length."""
  from crucible_jax.data.audio import load_wav, resample_linear
  waveform, rate = load_wav(path)
  if rate != int(data.sample_rate):
    waveform = resample_linear(waveform, rate / float(data.sample_rate))
  length = int(round(data.audio_seconds * data.sample_rate))
  out = np.zeros((length,), np.float32)
  out[: min(len(waveform), length)] = waveform[:length]
  return out, min(len(waveform), length)


def build_input(args: argparse.Namespace, data: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`batch` (zeros, one row) with the source modality filled from the input; ValueError naming a bad input."""
  try:
    return _fill(args, data, batch)
  except ValueError:
    raise
  except Exception as e:  # each decoder (PIL, wave, numpy) raises its own kinds on a damaged file
    kind = {IMAGE: "a PNG image", AUDIO: "a WAV file", VIDEO: "a .npy video", TEXT: "UTF-8 text"}[args.source]
    raise ValueError(f"cannot read input file {args.input} as {kind}: {type(e).__name__}: {e}") from e


def _fill(args: argparse.Namespace, data: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  from crucible_jax.data.tokenizers import tokenizer_of
  for m in MODALITIES:
    batch[present_key(m)][:] = m == args.source
  if args.source == TEXT:
    text = args.text if args.text is not None else pathlib.Path(args.input).read_text(encoding="utf-8").strip()
    batch[TEXT][0] = tokenizer_of(data).encode(text)
  elif args.source == IMAGE:
    batch[IMAGE][0] = _image(args.input, tuple(data.image_size))
  elif args.source == AUDIO:
    batch[AUDIO][0], batch["audio_len"][0] = read_audio(args.input, data)
  else:
    video = np.load(args.input).astype(np.float32)
    video = video[..., None] if video.ndim == 3 else video
    if video.shape != batch[VIDEO].shape[1:]:
      raise ValueError(f"video {args.input} has shape {video.shape}, the model wants {batch[VIDEO].shape[1:]}")
    batch[VIDEO][0] = video
  return batch


def run(args: argparse.Namespace, config: Any) -> int:
  """Restore the latest checkpoint of --workdir, convert the input, write the output; returns the exit status."""
  message, status = check_args(args)
  if message:
    return _error(message, status)
  import jax
  if jax.process_count() > 1:
    return _error(f"generate converts one input on one process; this job has {jax.process_count()} processes: "
                  "run it as a plain `crucible generate` (train and eval run across processes)")
  converter = config.model.get("converter", {})
  if not converter.get("enabled", False):
    return _error(f"{args.config} has model.converter.enabled=False: use a config with a converter "
                  "(e.g. experiments/digit_world.py:generate)")
  sources = converter.caption_sources if args.target == "text" else converter.image_sources
  if args.source not in sources:
    return _error(f"the converter does not map {args.source} to {args.target}: its "
                  f"{'caption' if args.target == 'text' else 'image'}_sources are {tuple(sources)}")
  import flax.linen as nn
  import jax
  from crucible_jax.data.schema import example_batch
  from crucible_jax.data.tokenizers import byte
  from crucible_jax import inference
  from crucible_jax.models import converter as converter_lib
  from crucible_jax.parallel.mesh import build_mesh
  try:  # the input first: a bad file costs no restore
    batch = build_input(args, config.data, example_batch(config.data, 1))
  except ValueError as e:
    return _error(str(e), 1)
  mesh = build_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])  # one input: one device
  try:  # params only: no optimizer state, train iterator or metric files; creates nothing in the workdir
    loaded = inference.load(args.workdir, config=config, mesh=mesh)
  except FileNotFoundError as e:
    return _error(str(e), 1)
  params, model, rules = loaded.params, loaded.experiment.model, loaded.experiment.rules
  if args.target == "text":
    method, extra = converter_lib.generate_caption, (args.beam,)
  else:
    method, extra = converter_lib.generate_image, ()

  def convert(p, b):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": p}, b, args.source, *extra, method=method)

  with jax.set_mesh(mesh):
    result = np.asarray(jax.jit(convert)(params, batch))
  if args.target == "text":
    print(byte.ByteTokenizer(1).decode(result[0]))  # the converter captions in byte tokens
    return 0
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out = pathlib.Path(args.output or pathlib.Path(args.workdir) / "generated" / f"{args.source}_to_image.png")
  out.parent.mkdir(parents=True, exist_ok=True)
  plt.imsave(out, result[0, ..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  print(out)
  return 0
