"""Train-time audio augmentation: waveform perturbation, SpecAugment masks, and an untouched eval path."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from crucible_jax.models import build_model, default_model_config
from crucible_jax.models.build import example_batch
from crucible_jax.models.encoders import AudioEncoder
from crucible_jax.models.melspec import AudioAugment, audio_augment_spec, perturb_waveform, spec_augment_keep

SAMPLES, RATE = 4000, 8000


def _speech(batch: int = 4, samples: int = SAMPLES) -> tuple[jax.Array, jax.Array]:
  """Sine bursts of different lengths, zero-padded."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(samples // 4, samples, batch)
  t = np.arange(samples) / RATE
  wave = np.sin(2 * np.pi * rng.uniform(200, 800, (batch, 1)) * t) * 0.5
  wave = np.where(np.arange(samples) < lengths[:, None], wave, 0.0)
  return jnp.asarray(wave, jnp.float32), jnp.asarray(lengths, jnp.int32)


def test_perturbation_keeps_shapes_is_deterministic_by_rng_and_leaves_padding_zero():
  wave, lengths = _speech()
  aug = AudioAugment(speed=(0.8, 1.2), snr_db=(5.0, 20.0), gain_db=(-6.0, 6.0))
  first = perturb_waveform(jax.random.key(1), wave, lengths, aug)
  again = perturb_waveform(jax.random.key(1), wave, lengths, aug)
  other = perturb_waveform(jax.random.key(2), wave, lengths, aug)
  assert first[0].shape == wave.shape and first[1].shape == lengths.shape
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])
  padding = np.arange(SAMPLES)[None, :] >= np.asarray(first[1])[:, None]
  assert np.all(np.asarray(first[0])[padding] == 0.0)
  assert np.all(np.asarray(first[0])[~padding] != 0.0)  # noise covers every valid sample


def test_speed_resamples_and_rescales_the_length():
  wave, lengths = _speech()
  out, new_lengths = perturb_waveform(jax.random.key(0), wave, lengths, AudioAugment(speed=(2.0, 2.0)))
  np.testing.assert_array_equal(new_lengths, np.asarray(lengths) // 2)
  for row in range(wave.shape[0]):
    n = int(new_lengths[row])
    np.testing.assert_allclose(out[row, :n], wave[row, : 2 * n : 2], atol=1e-6)


def test_gain_scales_by_the_drawn_decibels_and_noise_meets_its_snr():
  wave, lengths = _speech()
  louder, _ = perturb_waveform(jax.random.key(0), wave, lengths, AudioAugment(gain_db=(6.0, 6.0)))
  np.testing.assert_allclose(louder, wave * 10 ** (6 / 20), rtol=1e-5)
  noisy, _ = perturb_waveform(jax.random.key(0), wave, lengths, AudioAugment(snr_db=(10.0, 10.0)))
  for row in range(wave.shape[0]):
    n = int(lengths[row])
    signal, noise = np.asarray(wave[row, :n]), np.asarray(noisy[row, :n] - wave[row, :n])
    snr = 10 * np.log10(np.mean(signal**2) / np.mean(noise**2))
    assert abs(snr - 10.0) < 0.5, snr


def test_spec_augment_masks_stripes_of_at_most_the_widest_size_inside_valid_frames():
  frames, mels = 50, 16
  valid = jnp.asarray([50, 30, 10, 40])
  frame_mask = jnp.arange(frames)[None, :] < valid[:, None]
  aug = AudioAugment(time_masks=2, time_mask_frames=5, freq_masks=1, freq_mask_bins=3)
  keep = np.asarray(spec_augment_keep(jax.random.key(3), frame_mask, mels, aug))
  assert keep.shape == (4, frames, mels)
  for row in range(4):
    dead_frames = np.nonzero(~keep[row].any(axis=1))[0]  # frames masked in every bin: time stripes
    dead_bins = np.nonzero(~keep[row].any(axis=0))[0]  # bins masked in every frame: frequency stripes
    assert len(dead_frames) <= 2 * 5 and len(dead_bins) <= 3
    assert np.all(dead_frames < int(valid[row]))
    partial = ~keep[row]  # every masked cell is in a dead frame or a dead bin
    partial[dead_frames] = False
    partial[:, dead_bins] = False
    assert not partial.any()
  assert (~keep).any()
  np.testing.assert_array_equal(keep, spec_augment_keep(jax.random.key(3), frame_mask, mels, aug))


@functools.cache
def _encoders() -> tuple[AudioEncoder, AudioEncoder, dict]:
  """A tiny audio encoder with SpecAugment only, its unaugmented twin, and their shared params."""
  kw = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
  masked = AudioEncoder(augment=AudioAugment(time_masks=2, time_mask_frames=4, freq_masks=2, freq_mask_bins=4), **kw)
  plain = AudioEncoder(**kw)
  wave, lengths = _speech()
  params = jax.jit(plain.init)(jax.random.key(0), wave, lengths)
  return masked, plain, params


def test_masks_zero_features_in_training_and_eval_is_bitwise_unaugmented():
  masked, plain, params = _encoders()
  wave, lengths = _speech()
  features = lambda module, train, rng: module.apply(  # noqa: E731
      params, wave, lengths, train, method=AudioEncoder.features, rngs={"dropout": rng})
  reference, _ = jax.jit(features, static_argnums=(0, 1))(plain, False, jax.random.key(0))
  trained, _ = jax.jit(features, static_argnums=(0, 1))(masked, True, jax.random.key(5))
  reference, trained = np.asarray(reference), np.asarray(trained)
  zeroed = (trained == 0.0) & (reference != 0.0)
  assert zeroed.any()
  np.testing.assert_array_equal(trained[~zeroed], reference[~zeroed])  # masks change nothing else
  evaluated = jax.jit(lambda p: masked.apply(p, wave, lengths))(params)
  expected = jax.jit(lambda p: plain.apply(p, wave, lengths))(params)
  np.testing.assert_array_equal(evaluated[0], expected[0])


def test_training_without_a_dropout_rng_is_a_clear_error():
  masked, _, params = _encoders()
  wave, lengths = _speech()
  with pytest.raises(ValueError, match="'dropout' rng"):
    masked.apply(params, wave, lengths, True)


def test_config_builds_the_spec_and_rejects_bad_fields():
  cfg = default_model_config().audio.augment
  assert audio_augment_spec(cfg) is None  # off by default
  cfg.enabled = True
  spec = audio_augment_spec(cfg)
  assert spec.speed == tuple(cfg.speed) and spec.time_masks == cfg.time_masks
  for field, value, message in (("speed", (1.2, 0.8), "low <= high"), ("time_masks", -1, "integer >= 0"),
                                ("speed", (0.0, 1.0), "positive")):
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad[field] = value
    with pytest.raises(ValueError, match=f"audio.augment.{field}.*{message}"):
      audio_augment_spec(bad)
  extra = ml_collections.ConfigDict({**cfg.to_dict(), "pitch": 2})
  with pytest.raises(ValueError, match="unknown fields \\['pitch'\\]"):
    audio_augment_spec(extra)


def test_the_model_augments_audio_only_in_training():
  cfg = default_model_config()
  cfg.modalities = ("audio", "text")
  cfg.audio.augment.enabled = True
  model = build_model(cfg)
  assert model.config.audio_augment == audio_augment_spec(cfg.audio.augment)
  batch = example_batch(cfg, 2)
  batch["audio"], batch["audio_len"] = _speech(2, batch["audio"].shape[1])
  params = jax.jit(model.init, static_argnames=("heads",))(jax.random.key(0), batch, heads=("embed",))
  encode = jax.jit(lambda p, train, rng: model.apply(p, batch, train, ("audio",), method=model.encode,
                                                     rngs={"dropout": rng})["audio"][0], static_argnums=1)
  eval_a, eval_b = encode(params, False, jax.random.key(1)), encode(params, False, jax.random.key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.array_equal(encode(params, True, jax.random.key(1)), encode(params, True, jax.random.key(2)))
