"""Synthetic eSpeak NG voices: a deterministic bank at prepare time, train-only speakers, clear errors."""

import types

import numpy as np
import pytest

from crucible_jax.data.digit_world import builder, draw, pipeline, render, voices
from crucible_jax.data.digit_world.config import default_data_config

COUNT = 3
SIZES = dict(train_size=200, val_size=40, test_size=40, heldout_size=40)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path_factory.mktemp("digit_world_voices"))
  cfg.update(SIZES, synthetic_voices=COUNT, synthetic_share=0.5)
  builder.prepare_digit_world(cfg)
  return cfg


def _speakers(cfg, split: str) -> set[int]:
  source = builder.digit_world_source(cfg, split)
  return {int(source[i]["speaker"]) for i in range(len(source))}


def test_voice_table_is_deterministic_by_seed_and_spans_the_languages():
  table = voices.voice_table(len(voices.LANGUAGES), seed=0)
  assert table == voices.voice_table(len(voices.LANGUAGES), seed=0)
  assert table != voices.voice_table(len(voices.LANGUAGES), seed=1)
  assert {v.language for v in table} == set(voices.LANGUAGES)
  assert all(voices.RATE_WPM[0] <= v.rate <= voices.RATE_WPM[1] for v in table)
  with pytest.raises(ValueError, match=">= 0"):
    voices.voice_table(-1, seed=0)


def test_prepare_synthesises_a_bank_that_is_the_same_bytes_when_rebuilt(cfg, tmp_path):
  built = voices.bank_path(cfg.data_dir, COUNT, cfg.seed)
  assert built.is_file()
  rebuilt = voices.build_bank(tmp_path / "bank.npz", COUNT, cfg.seed)
  with np.load(built) as first, np.load(rebuilt) as second:
    np.testing.assert_array_equal(first["audio"], second["audio"])
    np.testing.assert_array_equal(first["lengths"], second["lengths"])
  clips, rate = voices.load_bank(built, COUNT)
  assert rate == voices.ESPEAK_RATE and len(clips) == COUNT and all(len(c) == 10 for c in clips)
  assert all(len(c) > rate // 10 and np.sqrt(np.mean(c**2)) > 0.01 for row in clips for c in row)  # audible speech


def test_only_train_hears_synthetic_voices_and_the_heldout_speaker_stays_out(cfg):
  heldout = draw.SPEAKERS.index(cfg.heldout_speaker)
  real = set(range(len(draw.SPEAKERS))) - {heldout}
  train = _speakers(cfg, "train")
  assert train - real == set(range(len(draw.SPEAKERS), len(draw.SPEAKERS) + COUNT))
  assert train & real == real
  for split in ("val", "test"):
    assert _speakers(cfg, split) <= real
  assert _speakers(cfg, "test_heldout_speaker") == {heldout}


def test_synthetic_speech_renders_within_the_real_speech_bounds(cfg):
  plain = types.SimpleNamespace(**cfg.to_dict())  # what the pipeline's workers render with
  source = builder.digit_world_source(cfg, "train")
  recipe = next(source[i] for i in range(len(source)) if source[i]["speaker"] >= len(draw.SPEAKERS))
  sample = render.render_sample(recipe, plain, split_seed=0, epoch=0)
  np.testing.assert_array_equal(sample["audio"], render.render_sample(recipe, cfg, split_seed=0, epoch=0)["audio"])
  assert 0 < sample["audio_len"] <= len(sample["audio"]) and np.abs(sample["audio"]).max() > 0.05
  bank = builder.voice_bank_of(cfg)
  longest = max(len(c) for row in draw.speaker_clips(cfg.sample_rate) for c in row)
  fitted = draw.voice_clips(cfg.sample_rate, *bank)
  assert len(fitted) == len(draw.SPEAKERS) + COUNT
  assert max(len(c) for row in fitted for c in row) <= longest


def test_the_voices_change_the_dataset_name_and_bad_settings_are_named(cfg):
  real_only = default_data_config()
  real_only.update(SIZES)
  assert builder.builder_config_of(cfg).name != builder.builder_config_of(real_only).name
  for overrides, message in ((dict(synthetic_voices=-2), "synthetic_voices=-2"),
                             (dict(synthetic_voices=0, synthetic_share=0.5), "needs data.synthetic_voices"),
                             (dict(synthetic_share=1.5), "synthetic_share=1.5")):
    bad = default_data_config()
    bad.update(SIZES, synthetic_voices=COUNT)
    bad.update(overrides)
    with pytest.raises(ValueError, match=message):
      builder.builder_config_of(bad)


def test_a_corrupt_or_missing_bank_and_a_bankless_synthetic_speaker_are_clear_errors(cfg, tmp_path):
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a bank")
  with pytest.raises(ValueError, match="broken.npz"):
    voices.load_bank(broken, COUNT)
  with pytest.raises(FileNotFoundError, match="crucible prepare digit_world"):
    voices.load_bank(tmp_path / "absent.npz", COUNT)
  with pytest.raises(ValueError, match="no bank"):
    draw.speak(np.array([1, 2]), len(draw.SPEAKERS), 32000, cfg.sample_rate, 20.0, np.random.default_rng(0))
