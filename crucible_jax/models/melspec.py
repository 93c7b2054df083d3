"""Log-mel spectrogram in pure jnp, so audio features are computed on the accelerator inside the jitted step."""

import numpy as np
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LOG_FLOOR = 1e-6


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_center_frequencies(sample_rate: int, n_mels: int) -> np.ndarray:
  """Centre frequency (Hz) of each of the `n_mels` triangular filters, evenly spaced in mel from 0 to Nyquist."""
  edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
  return edges[1:-1]


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Triangular filters f32[n_fft // 2 + 1, n_mels], peak 1 at each centre; built with numpy at trace time."""
  edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
  bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)[:, None]
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bin_hz - lower) / (center - lower)
  falling = (upper - bin_hz) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def num_frames(num_samples: int, hop: int) -> int:
  """Frames of a `num_samples` waveform: one per hop, starting at sample 0 (the tail is zero-padded)."""
  return -(-num_samples // hop)


def log_mel_spectrogram(
    wave: Float[Array, "b t"],
    lengths: Int[Array, " b"],
    *,
    sample_rate: int,
    n_fft: int,
    hop: int,
    n_mels: int,
) -> tuple[Float[Array, "b frames mels"], Bool[Array, "b frames"]]:
  """log(mel power + 1e-6) of hann-windowed frames; frame i is valid iff it starts before `lengths`.

  Samples at or past `lengths` are zeroed first so padding never leaks into a valid frame; invalid frames are 0.
  """
  if wave.ndim != 2:
    raise ValueError(f"wave must be [batch, samples], got shape {wave.shape}")
  if n_fft < hop:
    raise ValueError(f"n_fft={n_fft} must be at least hop={hop}")
  samples = wave.shape[1]
  wave = wave.astype(jnp.float32)
  sample_index = jnp.arange(samples)
  wave = jnp.where(sample_index[None, :] < lengths[:, None], wave, 0.0)
  frames = num_frames(samples, hop)
  wave = jnp.pad(wave, ((0, 0), (0, (frames - 1) * hop + n_fft - samples)))
  gather = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  framed = wave[:, gather] * jnp.asarray(np.hanning(n_fft + 1)[:-1], jnp.float32)
  power = jnp.abs(jnp.fft.rfft(framed, n=n_fft, axis=-1)) ** 2
  mel = jnp.einsum("bfk,km->bfm", power, jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels)))
  frame_mask = (jnp.arange(frames) * hop)[None, :] < lengths[:, None]
  log_mel = jnp.where(frame_mask[..., None], jnp.log(mel + LOG_FLOOR), 0.0)
  return log_mel, frame_mask
