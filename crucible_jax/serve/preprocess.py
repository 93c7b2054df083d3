"""Uploaded queries to encoder inputs: decode (Pillow, soundfile, numpy) and fit the export's `preprocessing` schema.

Images (and video frames) are grayscale, or RGB for 3 channels, centre-cropped to the model's aspect, resized
(bicubic), scaled to [0, 1] and normalised by the manifest's mean/std: own data's eval preprocessing, so a query
matches what `crucible index` stored. Audio is mixed to mono, resampled (polyphase, anti-aliased) and cut or
zero-padded; video is an animated GIF (or a .npy [F, H, W(, C)] in [0, 1]) with frames repeated or cut to the frame
count; text goes through the tokenizer the manifest names (crucible_jax.data.tokenizers).
"""

import io
from typing import Any, Mapping

import numpy as np
import soundfile
from PIL import Image, ImageSequence, UnidentifiedImageError

from crucible_jax.data.tokenizers import build_tokenizer
from crucible_jax.data.own.preprocess import centre_box, crop_resize, resample

MAGIC = ((b"\x89PNG", "image"), (b"\xff\xd8\xff", "image"), (b"BM", "image"), (b"RIFF", "audio"), (b"fLaC", "audio"),
         (b"OggS", "audio"), (b"\x93NUMPY", "video"), (b"GIF8", None))  # None: GIF, image or video by frame count


class InputError(ValueError):
  """A query that cannot be encoded; `status` is the HTTP status it maps to (400, 415 or 422)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def sniff(data: bytes) -> str:
  """The modality of an uploaded file from its first bytes; InputError (415) for anything else."""
  if not data:
    raise InputError("the uploaded file is empty")
  for magic, modality in MAGIC:
    if data.startswith(magic):
      if modality is not None:
        return modality
      try:
        return "video" if getattr(Image.open(io.BytesIO(data)), "n_frames", 1) > 1 else "image"
      except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"corrupt GIF: {e}", 422) from e
  raise InputError("unsupported file type: expected PNG/JPEG/BMP/GIF (image), WAV/FLAC/OGG (audio) or animated "
                   "GIF/.npy (video)", 415)


def _frame(image: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
  """The centre crop of the model's aspect, resized (bicubic) to its size, in [0, 1] then normalised by mean/std:
  the own-data eval preprocessing, so queries match what `crucible index` stored."""
  image = image.convert("RGB" if spec["channels"] == 3 else "L")
  height, width = spec["size"]
  box = centre_box(image.width, image.height, width / height)
  return crop_resize(image, box, (height, width), np.asarray(spec.get("mean", [0.0]), np.float32),
                     np.asarray(spec.get("std", [1.0]), np.float32))


def image_inputs(data: bytes, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise InputError(f"corrupt image: {e}", 422) from e
  return {"image": _frame(image, spec)[None]}


def audio_inputs(data: bytes, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
  try:
    waveform, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
    raise InputError(f"corrupt or unsupported audio: {e}", 422) from e
  waveform = waveform.mean(axis=1)
  if not len(waveform):
    raise InputError("the audio has no samples", 422)
  if rate != spec["sample_rate"]:
    waveform = resample(waveform, int(rate), int(spec["sample_rate"]))
  length = min(len(waveform), spec["samples"])
  audio = np.zeros((1, spec["samples"]), np.float32)
  audio[0, :length] = waveform[:length]
  return {"audio": audio, "audio_len": np.array([length], np.int32)}


def video_inputs(data: bytes, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
  try:
    if data.startswith(b"\x93NUMPY"):
      frames = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
      if frames.ndim == 3:
        frames = frames[..., None]
      if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise InputError(f"a .npy video must be [F, H, W(, C)], got shape {frames.shape}", 422)
      images = [Image.fromarray((np.clip(f, 0, 1) * 255).astype(np.uint8).squeeze(-1) if f.shape[-1] == 1
                                else (np.clip(f, 0, 1) * 255).astype(np.uint8)) for f in frames]
    else:
      images = [f.copy() for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))]
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise InputError(f"corrupt video: {e}", 422) from e
  if not images:
    raise InputError("the video has no frames", 422)
  picks = np.linspace(0, len(images) - 1, spec["frames"]).round().astype(int)
  return {"video": np.stack([_frame(images[i], spec) for i in picks])[None]}


def text_inputs(text: str, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
  if not text.strip():
    raise InputError("empty text query")
  try:
    tokenizer = build_tokenizer(spec["tokenizer"]["kind"], spec["tokenizer"].get("path"), spec["max_len"])
    return {"text": tokenizer.encode(text)[None]}
  except ValueError as e:
    raise InputError(str(e)) from e


DECODERS = {"image": image_inputs, "audio": audio_inputs, "video": video_inputs}


def file_inputs(data: bytes, preprocessing: Mapping[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
  """(modality, encoder inputs with a batch of 1) of an uploaded file."""
  modality = sniff(data)
  return modality, DECODERS[modality](data, preprocessing[modality])
