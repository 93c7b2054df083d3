"""Log-mel spectrogram and train-time audio augmentation in pure jnp, computed on the accelerator in the jitted step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


@dataclasses.dataclass(frozen=True)
class AudioAugment:
  """Train-time audio augmentation; each part is off at its neutral value (the defaults)."""

  speed: tuple[float, float] = (1.0, 1.0)  # resampling factor range; > 1 speeds up (and raises pitch)
  snr_db: tuple[float, float] | None = None  # additive white noise at this SNR range (dB) of the valid speech
  gain_db: tuple[float, float] = (0.0, 0.0)  # loudness change range (dB)
  time_masks: int = 0  # SpecAugment time masks per utterance
  time_mask_frames: int = 0  # widest time mask, frames
  freq_masks: int = 0  # SpecAugment frequency masks per utterance
  freq_mask_bins: int = 0  # widest frequency mask, mel bins


def _uniform(rng: jax.Array, batch: int, bounds: tuple[float, float]) -> Float[Array, " b"]:
  return jax.random.uniform(rng, (batch,), jnp.float32, bounds[0], bounds[1])


def perturb_waveform(
    rng: jax.Array, wave: Float[Array, "b t"], lengths: Int[Array, " b"], aug: AudioAugment
) -> tuple[Float[Array, "b t"], Int[Array, " b"]]:
  """Speed (linear-interpolation resampling), gain, then white noise at a random SNR; per utterance.

  Only the first (new) `lengths` samples carry signal or noise; the padding stays zero.
  """
  batch, samples = wave.shape
  speed_rng, gain_rng, snr_rng, noise_rng = jax.random.split(rng, 4)
  wave = wave.astype(jnp.float32)
  index = jnp.arange(samples)
  if aug.speed != (1.0, 1.0):
    speed = _uniform(speed_rng, batch, aug.speed)
    positions = index[None, :].astype(jnp.float32) * speed[:, None]
    left = jnp.clip(jnp.floor(positions).astype(jnp.int32), 0, samples - 1)
    right = jnp.minimum(left + 1, samples - 1)
    frac = positions - left
    gathered = jnp.take_along_axis(wave, left, 1) * (1 - frac) + jnp.take_along_axis(wave, right, 1) * frac
    lengths = jnp.minimum(jnp.floor(lengths / speed).astype(jnp.int32), samples)
    wave = jnp.where(index[None, :] < lengths[:, None], gathered, 0.0)
  valid = index[None, :] < lengths[:, None]
  if aug.gain_db != (0.0, 0.0):
    wave = wave * (10.0 ** (_uniform(gain_rng, batch, aug.gain_db) / 20.0))[:, None]
  if aug.snr_db is not None:
    power = jnp.sum(wave * wave, axis=1) / jnp.maximum(lengths, 1)
    noise_std = jnp.sqrt(power / 10.0 ** (_uniform(snr_rng, batch, aug.snr_db) / 10.0))
    noise = jax.random.normal(noise_rng, wave.shape, jnp.float32) * noise_std[:, None]
    wave = jnp.where(valid, wave + noise, 0.0)
  return wave, lengths


def spec_augment_keep(
    rng: jax.Array, frame_mask: Bool[Array, "b frames"], n_mels: int, aug: AudioAugment
) -> Bool[Array, "b frames mels"]:
  """SpecAugment's keep-mask: False inside `time_masks` time and `freq_masks` frequency stripes per utterance.

  Each stripe's width is uniform in [0, widest]; time stripes start within the utterance's valid frames.
  """
  batch, frames = frame_mask.shape
  keep = jnp.ones((batch, frames, n_mels), bool)
  valid_frames = frame_mask.sum(axis=1)
  stripes = (("time", aug.time_masks, aug.time_mask_frames, frames, valid_frames),
             ("freq", aug.freq_masks, aug.freq_mask_bins, n_mels, jnp.full((batch,), n_mels)))
  for (axis, count, widest, size, extent), axis_rng in zip(stripes, jax.random.split(rng)):
    for stripe_rng in jax.random.split(axis_rng, count) if count and widest else ():
      width_rng, start_rng = jax.random.split(stripe_rng)
      width = jax.random.randint(width_rng, (batch,), 0, widest + 1)
      room = jnp.maximum(extent - width + 1, 1)  # start positions that keep the stripe inside the extent
      start = jnp.floor(jax.random.uniform(start_rng, (batch,)) * room).astype(jnp.int32)
      position = jnp.arange(size)[None, :]
      stripe = (position >= start[:, None]) & (position < (start + width)[:, None])
      keep &= ~(stripe[:, :, None] if axis == "time" else stripe[:, None, :])
  return keep


def _bounds(cfg: ml_collections.ConfigDict, key: str) -> tuple[float, float]:
  value = cfg[key]
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value) or value[0] > value[1]):
    raise ValueError(f"audio.augment.{key}={value!r} must be (low, high) with low <= high")
  return float(value[0]), float(value[1])


def _count(cfg: ml_collections.ConfigDict, key: str) -> int:
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"audio.augment.{key}={value!r} must be an integer >= 0")
  return value


def audio_augment_spec(cfg: ml_collections.ConfigDict | None) -> AudioAugment | None:
  """The AudioAugment of `model.audio.augment` (None when absent or `enabled` is False); errors name the field."""
  if cfg is None or not cfg.get("enabled", False):
    return None
  known = {f.name for f in dataclasses.fields(AudioAugment)} | {"enabled"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"audio.augment has unknown fields {unknown}; known: {sorted(known)}")
  speed = _bounds(cfg, "speed")
  if speed[0] <= 0:
    raise ValueError(f"audio.augment.speed={cfg.speed!r} must be positive")
  return AudioAugment(
      speed=speed, snr_db=None if cfg.get("snr_db") is None else _bounds(cfg, "snr_db"),
      gain_db=_bounds(cfg, "gain_db"), time_masks=_count(cfg, "time_masks"),
      time_mask_frames=_count(cfg, "time_mask_frames"), freq_masks=_count(cfg, "freq_masks"),
      freq_mask_bins=_count(cfg, "freq_mask_bins"))
