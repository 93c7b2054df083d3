"""DigitWorld: deterministic recipes, disjoint splits, aligned modalities, variants, clear asset errors."""

import os
import re
import shutil

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from crucible_jax.data import audio as audio_lib
from crucible_jax.data.digit_world import builder, draw, pipeline, render, templates
from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.data.tokenizers import byte
from crucible_jax.data.schema import BATCH_SCHEMA
from crucible_jax.common_types import MODALITIES

SIZES = dict(train_size=300, val_size=60, test_size=60, heldout_size=60)


def _config(data_dir, **overrides):
  cfg = default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.update(SIZES)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = _config(tmp_path_factory.mktemp("digit_world"))
  builder.prepare_digit_world(cfg)
  return cfg


@pytest.fixture(scope="module")
def records(cfg):
  return {split: [builder.digit_world_source(cfg, split)[i] for i in range(n)]
          for split, n in zip(builder.SPLITS, SIZES.values())}


@pytest.fixture(scope="module")
def val_samples(cfg, records):
  return [render.render_sample(r, cfg, split_seed=5, epoch=0) for r in records["val"]]


def _dataset_files(cfg):
  root = os.path.join(cfg.data_dir, "digit_world")
  found = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if ".array_record" in name:
        with open(os.path.join(directory, name), "rb") as f:
          found[name] = f.read()
  return found


def test_prepare_is_deterministic_and_idempotent(cfg, tmp_path):
  files = _dataset_files(cfg)
  assert len(files) == 4
  version_dir = builder.prepare_digit_world(cfg).data_dir
  stamp = os.path.getmtime(os.path.join(version_dir, "dataset_info.json"))
  builder.prepare_digit_world(cfg)  # a second call reuses the data
  assert os.path.getmtime(os.path.join(version_dir, "dataset_info.json")) == stamp
  again = _config(tmp_path / "again")
  builder.prepare_digit_world(again)
  assert _dataset_files(again) == files  # same seed, prepared twice: same bytes
  other = builder.digit_world_source(_config(tmp_path / "other", seed=1), "val")
  first = builder.digit_world_source(cfg, "val")
  assert any(other[i]["digit_string"] != first[i]["digit_string"] for i in range(10))


def test_records_are_in_order_and_well_formed(cfg, records):
  for split, recs in records.items():
    assert [int(r["index"]) for r in recs] == list(range(len(recs))), split
    for r in recs:
      n = int(r["num_digits"])
      assert 1 <= n <= cfg.max_digits
      assert (r["digits"][:n] >= 0).all() and (r["digits"][n:] == -1).all()
      assert r["digit_string"].decode() == "".join(map(str, r["digits"][:n]))
      assert not np.array_equal(r["digits"], r["distractor_digits"])
  lengths = [int(r["num_digits"]) for r in records["train"]]
  assert set(lengths) == set(range(1, cfg.max_digits + 1))


def test_render_is_deterministic_per_epoch(cfg, records):
  recipe = records["train"][3]
  first = render.render_sample(recipe, cfg, split_seed=1, epoch=0)
  again = render.render_sample(recipe, cfg, split_seed=1, epoch=0)
  later = render.render_sample(recipe, cfg, split_seed=1, epoch=1)
  for key in first:
    assert first[key].tobytes() == again[key].tobytes(), key
  assert not np.array_equal(first["image"], later["image"])
  assert not np.array_equal(first["audio"], later["audio"])
  assert np.array_equal(first["digits"], later["digits"])


def test_handwritten_images_are_disjoint_between_splits(cfg, records):
  pools = builder.handwritten_image_splits(cfg.seed)
  assert sum(len(p) for p in pools.values()) == 1797
  assert not set(pools["train"]) & set(pools["test"])
  assert not set(pools["train"]) & set(pools["val"])
  assert not set(pools["val"]) & set(pools["test"])
  used = {split: {int(i) for r in recs for i in r["image_index"] if i >= 0} for split, recs in records.items()}
  assert used["train"] <= set(pools["train"].tolist())
  assert used["val"] <= set(pools["val"].tolist())
  assert used["test"] | used["test_heldout_speaker"] <= set(pools["test"].tolist())
  assert not used["train"] & (used["test"] | used["val"])


def test_heldout_speaker_only_in_its_split(cfg, records):
  heldout = draw.SPEAKERS.index(cfg.heldout_speaker)
  for split in ("train", "val", "test"):
    speakers = {int(r["speaker"]) for r in records[split]}
    assert heldout not in speakers, split
  assert {int(r["speaker"]) for r in records["train"]} == set(range(3)) - {heldout}
  assert {int(r["speaker"]) for r in records["test_heldout_speaker"]} == {heldout}


def test_sample_matches_schema(cfg, val_samples):
  for key, (dtype, dims, _) in BATCH_SCHEMA.items():
    value = val_samples[0][key]
    assert value.dtype == np.dtype(dtype), key
    assert value.ndim == len(dims), key
  assert val_samples[0]["image"].shape == (16, 64, 1)
  assert val_samples[0]["video"].shape == (8, 16, 16, 1)
  assert val_samples[0]["audio"].shape == (32000,)


def test_captions_and_transcripts_name_the_digits(records, val_samples):
  languages = set()
  for recipe, sample in zip(records["val"], val_samples):
    digits = recipe["digits"][: recipe["num_digits"]].tolist()
    text = byte.ByteTokenizer(1).decode(sample["text"])
    assert templates.parse_digits(text) == digits, text
    languages.add("zh" if re.search("[\u4e00-\u9fff]", text) else "en")
    assert sample["digits"][: sample["num_digits"]].tolist() == digits
    assert templates.string_id(digits) == sample["string_id"]
  assert languages == {"en", "zh"}


def _expected_answer(question: str, digits: list[int]) -> str:
  """The answer, worked out from the question's words alone (independent of templates.answer)."""
  ordinals = ["first", "second", "third", "fourth"]
  if question.startswith("how many"):
    return str(len(digits))
  if "sum of the digits" in question:
    return str(sum(digits))
  if "odd or even" in question:
    return "odd" if sum(digits) % 2 else "even"
  if question.startswith("is there a"):
    return "yes" if int(question[len("is there a ")]) in digits else "no"
  return str(digits[ordinals.index(question.split()[3])])


def test_question_answers_are_correct(records, val_samples):
  types = set()
  for recipe, sample in zip(records["val"], val_samples):
    digits = recipe["digits"][: recipe["num_digits"]].tolist()
    question = byte.ByteTokenizer(1).decode(sample["question"])
    assert templates.ANSWERS[sample["answer"]] == _expected_answer(question, digits), question
    types.add(templates.QUESTION_TYPES[sample["question_type"]])
  assert types == set(templates.QUESTION_TYPES)


def test_extra_questions_are_answered_correctly_reproducibly_and_leave_the_sample_alone(cfg, records, val_samples):
  asking = _config(cfg.data_dir, extra_questions=3)
  questions, redrawn = set(), 0
  for recipe, plain in zip(records["val"], val_samples):
    sample = render.render_sample(recipe, asking, split_seed=5, epoch=0)
    assert sample["extra_questions"].shape == (3, asking.question_len) and sample["extra_answers"].shape == (3,)
    assert "extra_questions" not in plain and all(np.array_equal(sample[k], plain[k]) for k in plain)
    digits = recipe["digits"][: recipe["num_digits"]].tolist()
    for tokens, answer in zip(sample["extra_questions"], sample["extra_answers"]):
      question = byte.ByteTokenizer(1).decode(tokens)
      assert templates.ANSWERS[answer] == _expected_answer(question, digits), question
      questions.add(question)
    again = render.render_sample(recipe, asking, split_seed=5, epoch=0)
    assert np.array_equal(sample["extra_questions"], again["extra_questions"])
    later = render.render_sample(recipe, asking, split_seed=5, epoch=1)
    redrawn += not np.array_equal(sample["extra_questions"], later["extra_questions"])
  assert len(questions) >= 8 and redrawn > len(val_samples) // 2  # varied, and new questions each epoch


def _best_match(slot: np.ndarray, pixels: np.ndarray) -> float:
  """Highest normalised correlation of the glyph, at any scale and offset, with the slot."""
  best = -1.0
  for size in range(8, 15):
    template = draw.resize(pixels.astype(np.float32) / 16, size, size).ravel()
    template = (template - template.mean()) / (template.std() + 1e-6)
    windows = sliding_window_view(slot, (size, size)).reshape(-1, size * size)
    windows = (windows - windows.mean(1, keepdims=True)) / (windows.std(1, keepdims=True) + 1e-6)
    best = max(best, float((windows @ template).max() / template.size))
  return best


def test_image_slots_show_the_recipes_handwriting(records, val_samples):
  from sklearn.datasets import load_digits

  bank = load_digits()
  rng = np.random.default_rng(0)
  hits = total = 0
  for recipe, sample in zip(records["val"][:30], val_samples[:30]):
    n = int(recipe["num_digits"])
    outside = sample["image"][:, 16 * n :]
    assert outside.size == 0 or outside.max() < 0.1  # boxes after the last digit stay empty
    for k in range(n):
      slot = sample["image"][:, 16 * k : 16 * (k + 1), 0]
      others = rng.choice(np.nonzero(bank.target != recipe["digits"][k])[0], 5)
      truth = _best_match(slot, recipe["image_pixels"][k])
      hits += truth > max(_best_match(slot, bank.images[i]) for i in others)
      total += 1
  assert hits >= 0.9 * total, (hits, total)


def test_video_shows_each_digit_in_its_frames(records, val_samples):
  for recipe, sample in zip(records["val"], val_samples):
    n = int(recipe["num_digits"])
    ink = sample["video"].reshape(8, -1).max(axis=1)
    assert (ink[: 2 * n] > 0.2).all() and (ink[2 * n :] == 0).all()


def test_audio_fits_and_is_padded(cfg, records, val_samples):
  assert draw.worst_case_speech_seconds(cfg.sample_rate, cfg.max_digits) < cfg.audio_seconds
  for sample in val_samples:
    assert 0 < sample["audio_len"] <= sample["audio"].shape[0]
    assert (sample["audio"][sample["audio_len"] :] == 0).all()
    assert np.abs(sample["audio"]).max() <= 1.0
  # The longest clips, four times, never lose speech: the valid span holds every clip at the fastest speed.
  clips = draw.speaker_clips(cfg.sample_rate)
  speaker, digit = max(((s, d) for s in range(3) for d in range(10)), key=lambda sd: len(clips[sd[0]][sd[1]]))
  recipe = dict(records["val"][0], digits=np.full(4, digit, np.int32), num_digits=4, speaker=speaker)
  recipe["image_pixels"] = np.repeat(recipe["image_pixels"][:1], 4, axis=0)
  for epoch in range(10):
    sample = render.render_sample(recipe, cfg, split_seed=0, epoch=epoch)
    assert 4 * len(clips[speaker][digit]) / 1.1 <= sample["audio_len"] <= 32000


def test_corrupted_variant_flags_and_corrupts(cfg, records, val_samples):
  corrupt_cfg = _config(cfg.data_dir, variant="corrupted")
  counts = dict.fromkeys(MODALITIES, 0)
  for recipe, clean in zip(records["val"], val_samples):
    sample = render.render_sample(recipe, corrupt_cfg, split_seed=5, epoch=0)
    flags = {m: bool(sample[f"{m}_corrupted"]) for m in MODALITIES}
    assert not all(flags.values())
    for m in MODALITIES:
      counts[m] += flags[m]
      assert np.array_equal(sample[m], clean[m]) != flags[m], m  # corrupted ⇔ changed
    if flags["text"]:
      other = recipe["distractor_digits"][recipe["distractor_digits"] >= 0].tolist()
      assert templates.parse_digits(byte.ByteTokenizer(1).decode(sample["text"])) == other
    assert all(sample[f"{m}_present"] for m in MODALITIES)
  for m in MODALITIES:
    assert 5 <= counts[m] <= 35, counts  # about 35% of 60


def test_imbalanced_variant_has_easy_images_and_noisy_audio(cfg, records, val_samples):
  hard_cfg = _config(cfg.data_dir, variant="imbalanced")

  def noise_ratio(sample):  # power of the leading gap (noise only) over the whole utterance
    valid = sample["audio"][: sample["audio_len"]]
    return np.mean(valid[:160] ** 2) / np.mean(valid**2)

  clean_ratio = np.median([noise_ratio(s) for s in val_samples])
  samples = [render.render_sample(r, hard_cfg, split_seed=5, epoch=0) for r in records["val"][:20]]
  assert np.median([noise_ratio(s) for s in samples]) > 10 * clean_ratio
  again = render.render_sample(records["val"][0], hard_cfg, split_seed=5, epoch=3)
  assert np.array_equal(samples[0]["image"], again["image"])  # easy: no augmentation
  quiet_cfg = _config(cfg.data_dir, variant="imbalanced", speech_snr_db=(30.0, 30.0))  # the override wins
  quiet = [render.render_sample(r, quiet_cfg, split_seed=5, epoch=0) for r in records["val"][:20]]
  assert np.median([noise_ratio(s) for s in quiet]) < clean_ratio
  assert np.array_equal(quiet[0]["image"], samples[0]["image"])  # only the speech's noise level moved


@pytest.mark.parametrize("snr", [(10.0, 0.0), (5.0,), ("loud", 3.0)])
def test_bad_speech_snr_is_rejected_naming_the_field(cfg, snr):
  with pytest.raises(ValueError, match="speech_snr_db"):
    pipeline.validate_data_config(_config(cfg.data_dir, speech_snr_db=snr))


def test_templates():
  assert templates.parse_digits("数字三七一") == [3, 7, 1]
  assert templates.parse_digits("the number 371") == [3, 7, 1]
  assert templates.parse_digits("digits: zero one") == [0, 1]
  ids = {templates.string_id([int(c) for c in f"{i:0{n}d}"]) for n in range(1, 5) for i in range(10**n)}
  assert len(ids) == 11110
  assert templates.string_id([0, 7]) != templates.string_id([7])
  for template in range(len(templates.CAPTION_TEMPLATES)):  # the longest captions fit text_len=48
    assert len(templates.caption([7] * 4, template).encode()) <= 48
  assert all(len(templates.question(t, 3).encode()) <= 32 for t in range(len(templates.QUESTION_TYPES)))


def test_audio_utilities(tmp_path):
  rng = np.random.default_rng(0)
  tone = np.sin(np.arange(800) * 0.3).astype(np.float32)
  padded = np.concatenate([np.zeros(400, np.float32), tone, np.zeros(400, np.float32)])
  trimmed = audio_lib.trim_silence(padded, 8000)
  assert 780 <= len(trimmed) <= 820
  assert len(audio_lib.resample_linear(tone, 0.8)) == 1000
  noise = rng.normal(size=800).astype(np.float32)
  mixed = audio_lib.mix_at_snr(tone, noise, 10.0)
  assert np.isclose(10 * np.log10(np.mean(tone**2) / np.mean((mixed - tone) ** 2)), 10.0, atol=1e-3)
  waveform, rate = audio_lib.load_wav(draw.ASSET_DIR / "en_US_f_Allison" / "3.wav")
  assert rate == 8000 and waveform.dtype == np.float32 and 0.1 < np.abs(waveform).max() <= 1.0


def test_missing_or_corrupt_wav_names_the_file(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.wav"):
    audio_lib.load_wav(tmp_path / "nope.wav")
  (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wav file")
  with pytest.raises(ValueError, match="garbage.wav"):
    audio_lib.load_wav(tmp_path / "garbage.wav")
  good = (draw.ASSET_DIR / "en_US_f_Allison" / "3.wav").read_bytes()
  (tmp_path / "cut.wav").write_bytes(good[: len(good) // 2])
  with pytest.raises(ValueError, match="cut.wav"):
    audio_lib.load_wav(tmp_path / "cut.wav")
  assets = tmp_path / "assets"
  shutil.copytree(draw.ASSET_DIR, assets)
  os.remove(assets / "es_MX_f_Allison" / "7.wav")
  monkeypatch.setattr(draw, "ASSET_DIR", assets)
  draw.speaker_clips.cache_clear()
  try:
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join("es_MX_f_Allison", "7.wav"))):
      draw.speaker_clips(8000)
  finally:
    draw.speaker_clips.cache_clear()


def test_bad_config_is_rejected(cfg, records):
  with pytest.raises(ValueError, match="variant"):
    render.render_sample(records["val"][0], _config(cfg.data_dir, variant="noisy"), split_seed=0, epoch=0)
  with pytest.raises(ValueError, match="split"):
    builder.digit_world_source(cfg, "validation")
  with pytest.raises(ValueError, match="heldout_speaker"):
    builder.prepare_digit_world(_config(cfg.data_dir, heldout_speaker="nobody"))
  with pytest.raises(ValueError, match="extra_questions"):
    pipeline.validate_data_config(_config(cfg.data_dir, extra_questions=-1))


def test_noise_bank_is_fixed_read_only_and_sliced_deterministically():
  bank = audio_lib.noise_bank()
  assert bank.dtype == np.float32 and bank.shape == (audio_lib.NOISE_BANK_SIZE,) and not bank.flags.writeable
  assert abs(float(bank.mean())) < 0.01 and abs(float(bank.std()) - 1.0) < 0.01
  audio_lib.noise_bank.cache_clear()  # rebuilt from its fixed seed: the same bytes in every process
  assert audio_lib.noise_bank().tobytes() == bank.tobytes()
  first = audio_lib.noise_slice(5000, np.random.default_rng(3))
  assert first.tobytes() == audio_lib.noise_slice(5000, np.random.default_rng(3)).tobytes()
  assert first.tobytes() != audio_lib.noise_slice(5000, np.random.default_rng(4)).tobytes()
  assert len(first) == 5000 and np.shares_memory(first, audio_lib.noise_bank())
  with pytest.raises(ValueError, match="noise bank"):
    audio_lib.noise_slice(len(bank) + 1, np.random.default_rng(0))


def test_sample_streams_are_keyed_and_independent():
  def draws(*key, count=5):
    return [g.random(4).tolist() for g in render.sample_streams(*key, count)]

  first = draws(123, 5, 2)
  assert first == draws(123, 5, 2)  # reused generators are fully reset
  assert len({tuple(d) for d in first}) == 5  # the five streams differ
  assert draws(123, 5, 2, count=3) == first[:3]  # a stream does not depend on how many are made
  for other in [(124, 5, 2), (123, 6, 2), (123, 5, 3), (123, 2, 5)]:
    assert draws(*other)[0] != first[0], other
  big = (2**40, 2**33, 2**33)  # past the packed key's range: hashed, still deterministic
  assert draws(*big) == draws(*big) != first
  with pytest.raises(ValueError, match="non-negative"):
    render.sample_streams(1, 0, -1)


def test_rendering_in_threads_gives_the_same_bytes(cfg, records, val_samples):
  from concurrent.futures import ThreadPoolExecutor

  def one(recipe):
    return render.render_sample(recipe, cfg, split_seed=5, epoch=0)

  with ThreadPoolExecutor(4) as pool:
    threaded = list(pool.map(one, records["val"]))
  for got, expected in zip(threaded, val_samples):
    for key in expected:
      assert got[key].tobytes() == expected[key].tobytes(), key


def test_speech_speeds_are_quantised_and_cached(cfg):
  speeds = draw.speeds()
  assert len(speeds) == draw.SPEED_STEPS
  assert np.isclose(speeds[0], draw.SPEED[0]) and np.isclose(speeds[-1], draw.SPEED[1])
  clip, energy = draw.spoken_clip(cfg.sample_rate, 1, 7, 3)
  expected = audio_lib.resample_linear(draw.speaker_clips(cfg.sample_rate)[1][7], float(speeds[3]))
  assert clip.tobytes() == expected.tobytes() and not clip.flags.writeable
  assert np.isclose(energy, float(np.sum(expected.astype(np.float64) ** 2)))
  assert draw.spoken_clip(cfg.sample_rate, 1, 7, 3)[0] is clip
