"""Waveform utilities shared by DigitWorld and the real-benchmark loaders: read, trim, resample, mix."""

import functools
import os
import wave

import numpy as np

_PCM_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Read a PCM WAV file as (float32 mono waveform in [-1, 1], sample rate); errors name the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"WAV file not found: {path}")
  try:
    with wave.open(path, "rb") as reader:
      channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
      frames = reader.getnframes()
      raw = reader.readframes(frames)
  except (wave.Error, EOFError, OSError) as error:
    raise ValueError(f"corrupt or unsupported WAV file {path}: {error}") from error
  if width not in _PCM_DTYPES:
    raise ValueError(f"WAV file {path} has {8 * width}-bit samples; only 8/16/32-bit PCM is supported")
  if frames == 0 or len(raw) < frames * channels * width:
    raise ValueError(f"WAV file {path} is truncated: header promises {frames} frames")
  samples = np.frombuffer(raw, _PCM_DTYPES[width]).astype(np.float32)
  if width == 1:  # 8-bit WAV is unsigned, centred on 128
    samples = (samples - 128.0) / 128.0
  else:
    samples = samples / float(2 ** (8 * width - 1))
  waveform = samples.reshape(-1, channels).mean(axis=1)
  return waveform.astype(np.float32), rate


def trim_silence(
    waveform: np.ndarray, sample_rate: int, *, threshold_db: float = -35.0, frame_ms: float = 10.0
) -> np.ndarray:
  """Drop leading/trailing frames whose RMS is `threshold_db` below the loudest frame (keeps inner pauses)."""
  frame = max(1, int(sample_rate * frame_ms / 1000))
  num_frames = len(waveform) // frame
  if num_frames == 0:
    return waveform
  rms = np.sqrt(np.mean(waveform[: num_frames * frame].reshape(num_frames, frame) ** 2, axis=1) + 1e-12)
  loud = np.nonzero(20.0 * np.log10(rms / rms.max()) > threshold_db)[0]
  return waveform[loud[0] * frame : (loud[-1] + 1) * frame]


def resample_linear(waveform: np.ndarray, factor: float) -> np.ndarray:
  """Linear-interpolation resampling to `len / factor` samples: factor > 1 speeds up (and raises pitch)."""
  if factor <= 0:
    raise ValueError(f"resampling factor must be positive, got {factor}")
  new_length = max(1, int(round(len(waveform) / factor)))
  positions = np.arange(new_length, dtype=np.float64) * factor
  return np.interp(positions, np.arange(len(waveform)), waveform).astype(np.float32)


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
  """`signal + noise` with the noise scaled so that signal power / noise power = `snr_db` decibels."""
  if signal.shape != noise.shape:
    raise ValueError(f"signal {signal.shape} and noise {noise.shape} must have the same shape")
  signal_power = float(np.mean(signal.astype(np.float64) ** 2))
  noise_power = float(np.mean(noise.astype(np.float64) ** 2))
  return (signal + snr_scale(signal_power, noise_power, snr_db) * noise).astype(np.float32)


def snr_scale(signal_power: float, noise_power: float, snr_db: float) -> float:
  """Factor on the noise so that signal power / scaled noise power = `snr_db` decibels."""
  return float(np.sqrt(signal_power / ((noise_power + 1e-20) * 10.0 ** (snr_db / 10.0))))


NOISE_BANK_SIZE = 2**20  # standard-normal samples per process-wide noise bank (4 MB of float32)


@functools.lru_cache(maxsize=2)
def noise_bank(size: int = NOISE_BANK_SIZE, seed: int = 0) -> np.ndarray:
  """`size` float32 standard normals, the same in every process (fixed seed); read-only, built once per process.

  Renderers slice it at an offset drawn from their own random stream instead of drawing fresh Gaussians, which
  is what dominated the cost of noisy samples; the slice is then as deterministic as the offset.
  """
  bank = np.random.Generator(np.random.Philox(key=[seed, 0x6E6F697365])).standard_normal(size, dtype=np.float32)
  bank.flags.writeable = False
  return bank


def noise_slice(length: int, rng: np.random.Generator, bank: np.ndarray | None = None) -> np.ndarray:
  """`length` consecutive (read-only) samples of the noise bank from an offset drawn from `rng`."""
  bank = noise_bank() if bank is None else bank
  if not 0 <= length <= len(bank):
    raise ValueError(f"asked for {length} noise samples; the noise bank holds {len(bank)}")
  offset = int(rng.random() * (len(bank) - length + 1))  # uniform; one draw, cheaper than rng.integers
  return bank[offset : offset + length]
