"""Own data: manifests (JSONL, CSV) and WebDataset shards, bad records under both policies, exact resume, process
sharding, preprocessing, and `crucible train experiments/own_data.py:tiny` end to end on a real small collection."""

import io
import json
import math
import pathlib
import shutil
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from crucible_jax import cli
from crucible_jax.data import registry
from crucible_jax.data.formats.common import BadRecord
from crucible_jax.data.own import preprocess, records
from crucible_jax.data.own.config import detect_modalities, own_data_config
from crucible_jax.data.own.source import OwnSource
from crucible_jax.data.tokenizers.byte import ByteTokenizer

OWN_DATA = str(pathlib.Path(__file__).parent.parent / "experiments" / "own_data.py")


def _data(**fields) -> ml_collections.ConfigDict:
  cfg = own_data_config()
  cfg.update(image_size=(16, 16), video_size=(8, 8), video_frames=4, sample_rate=8000, audio_seconds=0.5, text_len=48,
             channels=1, image_mean=(0.5,), image_std=(0.25,), **fields)
  return cfg


def _write_manifest(root: pathlib.Path, rows: list) -> str:
  path = root / "m.jsonl"
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture()
def small(own_collection, tmp_path) -> pathlib.Path:
  """A folder with a copy of four records' media, to build (bad) manifests beside."""
  src = pathlib.Path(own_collection["manifest"]).parent
  for name in ("images/00000.png", "images/00001.png", "audio/en_US_f_Allison_0.wav"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    shutil.copy(src / name, tmp_path / name)
  (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
  return tmp_path


# --- the formats agree ---------------------------------------------------------------------------------------------

def test_jsonl_csv_and_shards_list_the_same_records(own_collection):
  by_format = {}
  for fmt in ("manifest", "csv", "shards"):
    cfg = _data(manifest=own_collection[fmt] if fmt != "shards" else None,
                shards=own_collection[fmt] if fmt == "shards" else None)
    rows = [row for _, _, row in records.entries(cfg, held_out=False)]
    assert len(rows) == 300 and all(isinstance(r, records.Row) for r in rows)
    by_format[fmt] = rows
    assert detect_modalities(cfg) == ("image", "text", "audio")
  jsonl, csv_rows, shards = by_format["manifest"], by_format["csv"], by_format["shards"]
  assert [r.texts[0] for r in jsonl] == [r.texts[0] for r in csv_rows] == [r.texts[0] for r in shards]
  assert [r.image for r in jsonl] == [r.image for r in csv_rows]
  assert len(jsonl[0].texts) == 2 and len(shards[0].texts) == 2 and len(csv_rows[0].texts) == 1
  # a tar member's bytes are the PNG file's bytes
  assert records.read_member(shards[7].image) == pathlib.Path(jsonl[7].image).read_bytes()


def test_held_out_split_is_disjoint_and_near_the_fraction(own_collection):
  cfg = _data(manifest=own_collection["manifest"])
  train, test = OwnSource(cfg, "train"), OwnSource(cfg, "test")
  assert len(train) + len(test) == 300
  assert set(r.where for r in train.records).isdisjoint(r.where for r in test.records)
  assert 10 <= len(test) <= 50  # 10% of 300 by a hash of each record's name


def test_eval_view_decodes_media_the_same_from_files_and_shards(own_collection):
  files = OwnSource(_data(manifest=own_collection["manifest"], eval_manifest=own_collection["manifest"]), "test")
  shards = OwnSource(_data(shards=own_collection["shards"], eval_shards=own_collection["shards"]), "test")
  for index in (0, 1, 299):
    a, b = files[index], shards[index]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["audio"], b["audio"])
    assert ByteTokenizer(48).decode(a["text"]) == ByteTokenizer(48).decode(b["text"]) == files.caption(index)
    assert a["image"].shape == (16, 16, 1) and a["audio"].shape == (4000,) and a["text"].shape == (48,)
    assert a["image_present"] and a["audio_present"] and not a.get("video_present", False)


# --- bad records ---------------------------------------------------------------------------------------------------

BAD_ROWS = [
    {"image": "images/00000.png", "text": "a good zero", "audio": "audio/en_US_f_Allison_0.wav"},  # line 1
    {"image": "images/missing.png", "text": "no such file"},  # line 2
    {"image": "images/00001.png", "text": "   "},  # line 3
    {"labels": ["x"]},  # line 4: no modality
    "{not json",  # line 5
    {"image": "images/broken.png", "text": "undecodable"},  # line 6 (found when read)
    {"image": "images/00001.png", "text": ["a good one", "another caption"]},  # line 7
]


@pytest.mark.parametrize("line, reason", [(2, "missing_file"), (3, "empty_caption"), (4, "no_modality"),
                                          (5, "malformed")])
def test_bad_row_stops_the_run_naming_the_line(small, line, reason):
  manifest = _write_manifest(small, [BAD_ROWS[0], BAD_ROWS[line - 1]])
  with pytest.raises(BadRecord, match=rf"m\.jsonl: record 'line 2': {reason}"):
    OwnSource(_data(manifest=manifest, eval_manifest=manifest), "test")


def test_undecodable_file_stops_at_read_naming_the_line(small):
  manifest = _write_manifest(small, [BAD_ROWS[0], BAD_ROWS[5]])
  source = OwnSource(_data(manifest=manifest, eval_manifest=manifest), "test")
  source[0]
  with pytest.raises(BadRecord, match=r"record 'line 2': corrupt_image"):
    source[1]


def test_skip_policy_counts_logs_and_goes_on(small, caplog):
  manifest = _write_manifest(small, BAD_ROWS)
  cfg = _data(manifest=manifest, eval_manifest=manifest, on_bad_record="skip")
  source = OwnSource(cfg, "test")
  assert [r.where for r in source.records] == ["line 1", "line 6", "line 7"]
  assert dict(source.stats["skipped"]) == {"missing_file": 1, "empty_caption": 1, "no_modality": 1, "malformed": 1}
  assert ByteTokenizer(48).decode(source[1]["text"]) == "a good one"  # line 6 is undecodable: line 7 stands in
  assert source.stats["skipped"]["corrupt_image"] == 1
  assert "line 6" in caplog.text and "corrupt_image" in caplog.text
  stats = registry.record_stats(cfg)
  assert stats["data/test/skipped_records"] >= 4


def _tar(path: pathlib.Path, members: dict[str, bytes]) -> str:
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def test_bad_shard_member_names_shard_and_key(small):
  png = (small / "images/00000.png").read_bytes()
  empty = _tar(small / "empty.tar", {"k1.png": png, "k1.txt": b"fine", "k3.png": png, "k3.txt": b"  \n"})
  with pytest.raises(BadRecord, match=r"empty\.tar: record 'key k3': empty_caption"):
    OwnSource(_data(shards=empty, eval_shards=empty), "test")
  broken = _tar(small / "broken.tar", {"k1.png": png, "k1.txt": b"fine", "k2.png": b"garbage", "k2.txt": b"bad"})
  source = OwnSource(_data(shards=broken, eval_shards=broken), "test")
  with pytest.raises(BadRecord, match=r"broken\.tar: record 'key k2': corrupt_image"):
    source[1]
  skipping = OwnSource(_data(shards=broken, eval_shards=broken, on_bad_record="skip"), "test")
  assert ByteTokenizer(48).decode(skipping[1]["text"]) == "fine"  # k2 cannot decode: k1 stands in (wrapping)
  assert skipping.stats["skipped"]["corrupt_image"] == 1


# --- the grain iterator ----------------------------------------------------------------------------------------------

def test_train_iterator_resumes_exactly_with_augmentation(own_collection):
  cfg = _data(manifest=own_collection["manifest"])
  iterator = registry.make_train_iterator(cfg, global_batch=8, seed=3)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed = registry.make_train_iterator(cfg, global_batch=8, seed=3)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  first_epoch = registry.make_train_iterator(cfg, global_batch=8, seed=3)
  batch = next(first_epoch)
  assert batch["image"].shape == (8, 16, 16, 1) and batch["weight"].min() == 1.0


def test_processes_read_disjoint_halves_of_the_global_batch(own_collection):
  cfg = _data(manifest=own_collection["manifest"])
  whole = next(registry.make_train_iterator(cfg, global_batch=8, seed=1, process_index=0, process_count=1))
  halves = [next(registry.make_train_iterator(cfg, global_batch=8, seed=1, process_index=p, process_count=2))
            for p in (0, 1)]
  assert sorted(np.concatenate([h["string_id"] for h in halves])) == sorted(whole["string_id"])
  assert set(halves[0]["string_id"]).isdisjoint(halves[1]["string_id"])


def test_eval_batches_cover_the_split_once_with_padding(own_collection):
  cfg = _data(manifest=own_collection["manifest"])
  n = registry.num_examples(cfg, "test")
  batches = list(registry.make_eval_batches(cfg, "test", batch_size=16))
  assert len(batches) == math.ceil(n / 16)
  weights = np.concatenate([b["weight"] for b in batches])
  assert weights.sum() == n and sorted(np.concatenate([b["string_id"] for b in batches])[weights > 0]) == list(range(n))


# --- preprocessing -------------------------------------------------------------------------------------------------

def test_resampler_removes_what_the_new_rate_cannot_hold():
  rate = 16000
  t = np.arange(rate) / rate
  above = np.sin(2 * np.pi * 6000 * t).astype(np.float32)  # above 8 kHz audio's 4 kHz Nyquist
  below = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
  rms = lambda x: float(np.sqrt(np.mean(x[200:-200] ** 2)))
  assert rms(preprocess.resample(above, rate, 8000)) < 0.01 * rms(above)
  assert abs(rms(preprocess.resample(below, rate, 8000)) / rms(below) - 1) < 0.02
  linear = np.interp(np.arange(8000) * 2.0, np.arange(rate), above)  # what linear interpolation keeps: an alias
  assert rms(linear) > 0.5 * rms(above)
  assert preprocess.resample(below, 44100, 8000).shape == (math.ceil(rate * 8000 / 44100),)  # 44.1k: up 80, down 441


def test_centre_and_random_resized_crops():
  assert preprocess.centre_box(100, 50, 1.0) == (25, 0, 75, 50)
  assert preprocess.centre_box(40, 80, 0.5) == (0, 0, 40, 80)
  rng = np.random.default_rng(0)
  boxes = [preprocess.random_box(120, 80, (0.3, 0.9), (0.75, 1.333), rng) for _ in range(200)]
  for left, top, right, bottom in boxes:
    assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
    assert 0.3 * 9600 * 0.9 <= (right - left) * (bottom - top) <= 0.9 * 9600 * 1.1
    assert 0.7 <= (right - left) / (bottom - top) <= 1.4
  assert len(set(boxes)) > 150


def test_image_normalisation_and_train_augmentation(small):
  Image.new("L", (40, 20), 200).save(small / "grey.png")
  mean, std = np.array([0.5], np.float32), np.array([0.25], np.float32)
  img = preprocess.decode_image(str(small / "grey.png"), 1, "m", "line 1")
  pixels = preprocess.crop_resize(img, preprocess.centre_box(40, 20, 1.0), (16, 16), mean, std)
  np.testing.assert_allclose(pixels, (200 / 255 - 0.5) / 0.25, atol=1e-5)
  manifest = _write_manifest(small, [BAD_ROWS[0]])
  source = OwnSource(_data(manifest=manifest, eval_manifest=manifest), "test")
  eval_view = source[0]["image"]
  np.testing.assert_array_equal(eval_view, source[0]["image"])
  views = [source.train_sample(0, np.random.default_rng(s))["image"] for s in range(3)]
  assert not np.array_equal(views[0], views[1]) and not np.array_equal(views[0], eval_view)
  np.testing.assert_array_equal(views[2], source.train_sample(0, np.random.default_rng(2))["image"])


def test_audio_random_window_in_training_start_in_eval():
  wave = np.arange(100, dtype=np.float32)
  out, valid = preprocess.fit_audio(wave, 40, None)
  np.testing.assert_array_equal(out, wave[:40]) and valid == 40
  starts = {int(preprocess.fit_audio(wave, 40, np.random.default_rng(s))[0][0]) for s in range(20)}
  assert len(starts) > 5 and max(starts) <= 60
  short, valid = preprocess.fit_audio(wave[:10], 40, np.random.default_rng(0))
  assert valid == 10 and not short[10:].any()


def test_video_from_a_frame_folder(small):
  (small / "clip").mkdir()
  for k, level in enumerate((0, 120, 250)):
    Image.new("L", (12, 12), level).save(small / "clip" / f"f{k + 1}.png")
  (small / "clip" / "f10.png").write_bytes((small / "clip" / "f3.png").read_bytes())  # natural order: f10 is last
  manifest = _write_manifest(small, [{"video": "clip", "text": "fading in"}])
  sample = OwnSource(_data(manifest=manifest, eval_manifest=manifest), "test")[0]
  assert sample["video"].shape == (4, 8, 8, 1) and sample["video_present"] and not sample["image_present"]
  levels = np.round((sample["video"][:, 0, 0, 0] * 0.25 + 0.5) * 255).astype(int).tolist()
  assert levels == [0, 120, 250, 250]  # 4 frames evenly over 4 files: f1, f2, f3, f10


# --- end to end through the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_crucible_train_own_data_tiny_writes_retrieval_results(own_collection, tmp_path, source, capsys):
  workdir = tmp_path / "run"
  status = cli.main(["train", "--config", f"{OWN_DATA}:tiny", f"--config.data.{source}", own_collection[source],
                     "--workdir", str(workdir), "--config.stages.align.steps=20"])
  assert status == 0, capsys.readouterr().err
  results = json.loads((workdir / "results.json").read_text())
  for pair in ("image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "audio_to_image"):
    assert 0.0 <= results[f"test/{pair}/R@1"] <= results[f"test/{pair}/R@10"] <= 1.0
  assert results["data/train/skipped_records"] == 0 and results["steps"] == 20
  # the spoken digit is the easiest cue here: audio→text R@10 above its chance (10 of ~30 test records, 0.33)
  assert results["test/audio_to_text/R@10"] > 0.5
