"""Items as the files a browser shows: PNG images, WAV audio, animated-GIF video (stored in the index)."""

import io

import numpy as np
import soundfile
from PIL import Image

MIME = {"image": "image/png", "audio": "audio/wav", "video": "image/gif", "text": "text/plain; charset=utf-8"}
SIGNATURES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"),
              (b"fLaC", "audio/flac"), (b"OggS", "audio/ogg"), (b"ID3", "audio/mpeg"), (b"\xff\xfb", "audio/mpeg"))


def _pil(pixels: np.ndarray) -> Image.Image:
  """[H, W, C] (or [H, W]) floats in [0, 1] as an 8-bit grayscale or RGB image."""
  array = np.clip(np.asarray(pixels, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array, "L" if array.ndim == 2 else "RGB")


def png(pixels: np.ndarray) -> bytes:
  """PNG bytes of one image in [0, 1]."""
  out = io.BytesIO()
  _pil(pixels).save(out, format="PNG")
  return out.getvalue()


def wav(waveform: np.ndarray, sample_rate: int) -> bytes:
  """16-bit PCM WAV bytes of a mono waveform in [-1, 1]."""
  out = io.BytesIO()
  soundfile.write(out, np.clip(np.asarray(waveform, np.float32), -1.0, 1.0), int(sample_rate), format="WAV",
                  subtype="PCM_16")
  return out.getvalue()


def gif(frames: np.ndarray, frame_ms: int = 150) -> bytes:
  """Looping animated-GIF bytes of [F, H, W, C] frames in [0, 1]."""
  images = [_pil(f) for f in frames]
  out = io.BytesIO()
  images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
  return out.getvalue()


def mime_of(data: bytes) -> str:
  """The media type of an image or audio file from its first bytes (application/octet-stream when unknown)."""
  if data[:4] == b"RIFF":
    return {b"WAVE": "audio/wav", b"WEBP": "image/webp"}.get(data[8:12], "application/octet-stream")
  return next((kind for magic, kind in SIGNATURES if data.startswith(magic)), "application/octet-stream")
