"""Real-benchmark loaders on tiny fixtures written in the official on-disk formats."""

import json
import os
import pickle

import grain
import ml_collections
import numpy as np
import pytest
import soundfile
from PIL import Image

from crucible_jax.data import formats
from crucible_jax.data.schema import check_batch
from crucible_jax.data.tokenizers.byte import ByteTokenizer

RGB = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3  # distinct exact pixel values


def write_image(path, pixels) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def write_json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def write_audio(path, wave, sr, subtype) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  soundfile.write(path, np.asarray(wave, np.float32), sr, subtype=subtype)


def corrupt(path) -> None:
  with open(path, "wb") as f:
    f.write(b"this is not a media file" * 4)


def first_batch(source, size: int) -> dict:
  return next(iter(grain.MapDataset.source(source).batch(size)))


# ---------------------------------------------------------------- COCO


def make_coco(root, annotations=None):
  write_image(root / "val2017" / "a.png", RGB)
  write_image(root / "val2017" / "b.jpg", np.full((8, 8, 3), (200, 100, 50), np.uint8))
  images = [{"id": 9, "file_name": "a.png"}, {"id": 3, "file_name": "b.jpg"}]
  annotations = annotations or [{"image_id": 9, "caption": "a cat "}, {"image_id": 3, "caption": "a dog"},
                                {"image_id": 9, "caption": "一只猫"}]
  write_json(root / "annotations" / "captions_val2017.json", {"images": images, "annotations": annotations})
  return str(root)


def test_coco_per_caption_decodes_captions_pixels_and_ids(tmp_path):
  src = formats.CocoCaptions(make_coco(tmp_path), image_size=(4, 6), text_len=16)
  assert len(src) == 3
  assert [ByteTokenizer(1).decode(src[i]["text"]) for i in range(3)] == ["a dog", "a cat", "一只猫"]
  assert [int(src[i]["string_id"]) for i in range(3)] == [3, 9, 9]
  np.testing.assert_array_equal(src[1]["image"], RGB.astype(np.float32) / 255.0)
  assert src[1]["image_present"] and src[1]["text_present"] and not src[1]["audio_present"]
  batch = first_batch(src, 3)
  check_batch(batch, required=("image", "text", "string_id"))
  assert batch["image"].shape == (3, 4, 6, 3) and src.stats["read"] >= 3
  clone = pickle.loads(pickle.dumps(src))  # grain worker processes receive pickled sources
  assert ByteTokenizer(1).decode(clone[0]["text"]) == "a dog"


def test_coco_per_image_grayscale_resized_and_all_captions(tmp_path):
  src = formats.CocoCaptions(make_coco(tmp_path), per="image", caption_index=1, image_size=3, channels=1)
  assert len(src) == 2
  assert src.captions(1) == ["a cat", "一只猫"] and ByteTokenizer(1).decode(src[1]["text"]) == "一只猫"
  assert ByteTokenizer(1).decode(src[0]["text"]) == "a dog"  # one caption: index wraps
  gray = src[0]["image"]  # JPEG of solid (200, 100, 50): luma 124
  assert gray.shape == (3, 3, 1)
  np.testing.assert_allclose(gray, 124 / 255, atol=3 / 255)


def test_coco_truncates_long_captions_and_counts_them(tmp_path):
  src = formats.CocoCaptions(make_coco(tmp_path), image_size=4, text_len=5)
  assert ByteTokenizer(1).decode(src[2]["text"]) == "一"  # cut at a character boundary (3 bytes of 9)
  assert src.stats["truncated"]["text"] == 1


@pytest.mark.parametrize("annotation, reason", [
    ({"image_id": 9}, "malformed"),
    ({"image_id": 9, "caption": "  "}, "empty_caption"),
    ({"image_id": 77, "caption": "ghost"}, "unknown_image"),
])
def test_coco_bad_annotation_raises_naming_record_or_is_skipped(tmp_path, annotation, reason):
  annotations = [{"image_id": 9, "caption": "a cat"}, annotation, {"image_id": 3, "caption": "a dog"}]
  root = make_coco(tmp_path, annotations)
  with pytest.raises(ValueError, match=r"captions_val2017\.json: record 'annotations\[1\]': " + reason):
    formats.CocoCaptions(root)
  src = formats.CocoCaptions(root, image_size=4, skip_bad_records=True)
  assert len(src) == 2 and src.stats["skipped"] == {reason: 1}


def test_coco_corrupt_image_raises_at_read_or_yields_next_good(tmp_path):
  root = make_coco(tmp_path)
  corrupt(tmp_path / "val2017" / "b.jpg")
  strict = formats.CocoCaptions(root, image_size=4)
  with pytest.raises(formats.BadRecord, match=r"b\.jpg: record 'image id 3': corrupt_image"):
    strict[0]
  src = formats.CocoCaptions(root, image_size=4, skip_bad_records=True)
  assert ByteTokenizer(1).decode(src[0]["text"]) == "a cat" and int(src[0]["string_id"]) == 9
  assert src.stats["skipped"] == {"corrupt_image": 1}


def test_missing_root_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    formats.CocoCaptions(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- VQA v2


def make_vqa(root):
  def annotation(qid, answer, kind):
    return {"question_id": qid, "multiple_choice_answer": answer, "answer_type": kind,
            "answers": [{"answer": answer if k < 7 else "maybe", "answer_id": k + 1} for k in range(10)]}
  train = [annotation(k, a, "other") for k, a in enumerate(["yes", "yes", "yes", "2", "2", "red"])]
  write_json(root / "v2_mscoco_train2014_annotations.json", {"annotations": train})
  questions = [{"image_id": 5, "question": "Is it red?", "question_id": 5000},
               {"image_id": 5, "question": "How many?", "question_id": 5001},
               {"image_id": 7, "question": "What color?", "question_id": 7000}]
  write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
  write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
      annotation(5000, "Yes", "yes/no"), annotation(5001, "2", "number"), annotation(7000, "red", "other")]})
  for image_id in (5, 7):
    write_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", np.full((6, 6, 3), 90, np.uint8))
  return str(root)


def test_vqa_vocab_from_training_answers_and_samples(tmp_path):
  root = make_vqa(tmp_path)
  src = formats.VqaV2(root, top_k=3, image_size=4, question_len=16)
  assert src.answer_vocab == ["yes", "2", "red"]
  assert [int(src[i]["answer"]) for i in range(3)] == [0, 1, 2]
  assert [int(src[i]["question_type"]) for i in range(3)] == [0, 1, 2]
  assert ByteTokenizer(1).decode(src[1]["question"]) == "How many?" and int(src[1]["string_id"]) == 5001
  assert src.answers(0) == ["Yes"] * 7 + ["maybe"] * 3
  assert src.answers_for_question(7000)[0] == "red"
  check_batch(first_batch(src, 3), required=("image", "question", "answer", "question_type"))


def test_vqa_unknown_answer_policies(tmp_path):
  root = make_vqa(tmp_path)
  with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations\.json: record 'question_id 7000'"):
    formats.VqaV2(root, top_k=2)
  skipped = formats.VqaV2(root, top_k=2, unknown_answer="skip")
  assert len(skipped) == 2 and skipped.stats["skipped"] == {"unknown_answer": 1}
  assert len(formats.VqaV2(root, top_k=2, skip_bad_records=True)) == 2
  kept = formats.VqaV2(root, answer_vocab=["yes", "2"], unknown_answer="keep", image_size=4)
  assert int(kept[2]["answer"]) == -1 and kept.answers(2)[0] == "red"


# ---------------------------------------------------------------- AudioSet


def make_audioset(root, extra_rows=()):
  with open(root / "class_labels_indices.csv", "w", encoding="utf-8") as f:
    f.write('index,mid,display_name\n0,/m/a,"Speech"\n1,/m/b,"Music"\n2,/t/c,"Dog, bark"\n')
  rows = ['seg1, 30.000, 40.000, "/m/a,/t/c"', 'seg2, 1.000, 2.000, "/m/b"', 'seg3, 0.000, 2.000, "/t/c"']
  with open(root / "eval_segments.csv", "w", encoding="utf-8") as f:
    f.write("# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ytids=3\n")
    f.write("# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join([*rows, *extra_rows]) + "\n")
  write_audio(root / "audio" / "seg1_30.000.wav", np.arange(8000) / 16000, 8000, "FLOAT")  # ramp at 8 kHz
  write_audio(root / "audio" / "seg2.flac", np.repeat([0.125, 0.25, 0.5], 16000), 16000, "PCM_16")
  write_audio(root / "audio" / "seg3.wav", np.full(32000, 0.25), 16000, "PCM_16")
  return str(root)


def test_audioset_audio_resampled_cropped_truncated_and_multi_hot(tmp_path):
  src = formats.AudioSet(make_audioset(tmp_path), csv="eval_segments.csv", audio_seconds=1.0, with_labels=True)
  assert len(src) == 3 and src.classes[2] == ("/t/c", "Dog, bark")
  ramp = src[0]
  np.testing.assert_allclose(ramp["audio"][:15999], np.arange(15999) / 32000, atol=1e-6)  # linear 8 -> 16 kHz
  assert int(ramp["audio_len"]) == 16000
  np.testing.assert_array_equal(ramp["labels"], [1, 0, 1])
  np.testing.assert_array_equal(src.labels(1), [0, 1, 0])
  assert src.label_names(0) == ["Speech", "Dog, bark"]
  np.testing.assert_array_equal(src[1]["audio"], np.full(16000, 0.25, np.float32))  # [1 s, 2 s) of the video
  assert int(src[2]["audio_len"]) == 16000 and src.stats["truncated"] == {"audio": 1}
  assert "truncated" not in str(src.stats["skipped"])


def test_audioset_batches_in_the_schema_without_labels(tmp_path):
  src = formats.AudioSet(make_audioset(tmp_path), csv="eval_segments.csv", audio_seconds=0.5)
  batch = first_batch(src, 3)
  check_batch(batch, required=("audio", "audio_len", "string_id"))
  assert batch["audio"].shape == (3, 8000) and not batch["image_present"].any()


@pytest.mark.parametrize("row, reason", [
    ('seg4, 0.000, 10.000, "/m/zzz"', "unknown_label"),
    ('seg5, 0.000, 10.000, "/m/a"', "missing_audio"),
    ("seg6, 0.000", "malformed"),
])
def test_audioset_bad_rows_raise_naming_line_or_are_skipped(tmp_path, row, reason):
  root = make_audioset(tmp_path, [row])
  with pytest.raises(ValueError, match=r"record 'line 7.*" + reason):
    formats.AudioSet(root, csv="eval_segments.csv")
  src = formats.AudioSet(root, csv="eval_segments.csv", skip_bad_records=True)
  assert len(src) == 3 and src.stats["skipped"] == {reason: 1}


def test_audioset_corrupt_audio_at_read_time(tmp_path):
  root = make_audioset(tmp_path)
  corrupt(tmp_path / "audio" / "seg3.wav")
  with pytest.raises(ValueError, match=r"seg3\.wav: record 'segment seg3': corrupt_audio"):
    formats.AudioSet(root, csv="eval_segments.csv")[2]
  src = formats.AudioSet(root, csv="eval_segments.csv", skip_bad_records=True)
  assert int(src[2]["string_id"]) == 0 and src.stats["skipped"] == {"corrupt_audio": 1}  # wraps to record 0


# ---------------------------------------------------------------- LibriSpeech

UTTERANCES = {("19", "198"): ["19-198-0000 NORTHANGER ABBEY", "19-198-0001 THIS LITTLE WORK"],
              ("26", "495"): ["26-495-0000 CHAPTER ONE"]}


def make_librispeech(root):
  rng = np.random.default_rng(0)
  waves = {}
  for (speaker, chapter), lines in UTTERANCES.items():
    chapter_dir = root / "test-clean" / speaker / chapter
    os.makedirs(chapter_dir)
    (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
      uttid = line.split()[0]
      waves[uttid] = rng.integers(-8000, 8000, size=4000 + 800 * len(waves)) / 32768
      write_audio(chapter_dir / f"{uttid}.flac", waves[uttid], 16000, "PCM_16")
  return str(root), waves


def test_librispeech_audio_transcripts_and_speakers(tmp_path):
  root, waves = make_librispeech(tmp_path)
  src = formats.LibriSpeech(root, audio_seconds=0.5, text_len=32)
  assert [src.utterance_id(i) for i in range(3)] == ["19-198-0000", "19-198-0001", "26-495-0000"]
  assert src.transcript(1) == "THIS LITTLE WORK" and ByteTokenizer(1).decode(src[1]["text"]) == "THIS LITTLE WORK"
  sample = src[2]
  assert int(sample["audio_len"]) == 5600 and int(sample["speaker"]) == 1
  np.testing.assert_array_equal(sample["audio"][:5600], waves["26-495-0000"].astype(np.float32))
  assert not sample["audio"][5600:].any()
  check_batch(first_batch(src, 3), required=("audio", "audio_len", "text", "speaker"))


def test_librispeech_missing_subset_and_bad_utterances(tmp_path):
  root, _ = make_librispeech(tmp_path)
  with pytest.raises(FileNotFoundError, match="dev-other"):
    formats.LibriSpeech(root, subset="dev-other")
  os.remove(tmp_path / "test-clean" / "19" / "198" / "19-198-0001.flac")
  with pytest.raises(ValueError, match=r"19-198-0001\.flac: record '19-198-0001': missing_audio"):
    formats.LibriSpeech(root)
  corrupt(tmp_path / "test-clean" / "26" / "495" / "26-495-0000.flac")
  src = formats.LibriSpeech(root, skip_bad_records=True)
  assert len(src) == 2 and ByteTokenizer(1).decode(src[1]["text"]) == "NORTHANGER ABBEY"  # record 1 corrupt: wraps to 0
  assert src.stats["skipped"] == {"missing_audio": 1, "corrupt_audio": 1}


# ---------------------------------------------------------------- video-text


def make_msrvtt(root):
  videos = [{"video_id": "video0", "split": "test"}, {"video_id": "video1", "split": "test"},
            {"video_id": "video9", "split": "train"}]
  sentences = [{"video_id": "video0", "caption": "a man cooks"}, {"video_id": "video1", "caption": "cars race"},
               {"video_id": "video0", "caption": "someone is cooking"}, {"video_id": "video9", "caption": "x"}]
  write_json(root / "msrvtt_test.json", {"videos": videos, "sentences": sentences})
  for k in range(10):  # natural order: f1 < f2 < ... < f10
    write_image(root / "frames" / "video0" / f"f{k + 1}.png", np.full((4, 4, 3), 20 * k, np.uint8))
  for k in range(2):
    write_image(root / "frames" / "video1" / f"{k:05d}.png", np.full((4, 4, 3), 100 + k, np.uint8))
  return str(root)


def test_video_text_msrvtt_samples_frames_uniformly(tmp_path):
  src = formats.VideoText(make_msrvtt(tmp_path), split="test", video_frames=4, frame_size=4)
  assert src.video_ids == ["video0", "video1"] and len(src) == 3
  assert [ByteTokenizer(1).decode(src[i]["text"]) for i in range(3)] == ["a man cooks", "someone is cooking", "cars race"]
  assert [int(src[i]["string_id"]) for i in range(3)] == [0, 0, 1]
  np.testing.assert_allclose(src[0]["video"][:, 0, 0, 0] * 255, [20, 60, 120, 160], atol=1e-4)  # frames 1,3,6,8
  np.testing.assert_allclose(src[2]["video"][:, 0, 0, 0] * 255, [100, 100, 101, 101], atol=1e-4)
  check_batch(first_batch(src, 3), required=("video", "text", "string_id"))


def test_video_text_missing_frames_and_video_files(tmp_path):
  root = make_msrvtt(tmp_path)
  with pytest.raises(ValueError, match=r"frames/video9: record 'video video9': missing_frames"):
    formats.VideoText(root)
  per_video = formats.VideoText(root, per="video", caption_index=1, skip_bad_records=True)
  assert len(per_video) == 2 and per_video.captions(0) == ["a man cooks", "someone is cooking"]
  assert ByteTokenizer(1).decode(per_video[0]["text"]) == "someone is cooking"
  assert per_video.stats["skipped"] == {"missing_frames": 1}
  os.makedirs(tmp_path / "videos")
  (tmp_path / "videos" / "video9.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
  with pytest.raises(ValueError, match=r"video9\.mp4: video files cannot be decoded.*ffmpeg -i"):
    formats.VideoText(root, skip_bad_records=True)


def test_video_text_youcook2_style(tmp_path):
  database = {"yt1": {"subset": "validation", "annotations": [
      {"id": 0, "segment": [0, 5], "sentence": "cut onions"}, {"id": 1, "segment": [6, 9], "sentence": "fry"}]},
              "yt2": {"subset": "training", "annotations": [{"id": 0, "segment": [0, 1], "sentence": "boil"}]}}
  write_json(tmp_path / "youcookii_annotations_val.json", {"database": database})
  for clip in ("yt1_0", "yt1_1"):
    write_image(tmp_path / "frames" / clip / "1.jpg", np.full((4, 4, 3), 128, np.uint8))
  src = formats.VideoText(str(tmp_path), "youcookii_annotations_val.json", split="validation", video_frames=3,
                          frame_size=(4, 2), channels=1)
  assert src.video_ids == ["yt1_0", "yt1_1"] and ByteTokenizer(1).decode(src[1]["text"]) == "fry"
  assert src[0]["video"].shape == (3, 4, 2, 1)


# ---------------------------------------------------------------- dispatch and helpers


def test_open_benchmark_dispatches_and_rejects_unknowns(tmp_path):
  cfg = ml_collections.ConfigDict({"root": make_coco(tmp_path), "per": "image", "image_size": 4})
  src = formats.open_benchmark("coco", cfg)
  assert isinstance(src, formats.CocoCaptions) and len(src) == 2
  with pytest.raises(ValueError, match=r"unknown benchmark 'imagenet'.*'audioset'.*'video_text'"):
    formats.open_benchmark("imagenet", cfg)
  with pytest.raises(ValueError, match=r"\['colour'\] are not arguments of CocoCaptions"):
    formats.open_benchmark("coco", {"root": str(tmp_path), "colour": 1})


def test_fill_absent_adds_zeros_only_for_absent_modalities(tmp_path):
  sample = formats.CocoCaptions(make_coco(tmp_path), image_size=4)[0]
  filled = formats.fill_absent(sample, {"image": (9, 9, 3), "audio": (80,), "video": (2, 4, 4, 3)})
  assert filled["image"].shape == (4, 4, 3) and filled["audio"].shape == (80,) and int(filled["audio_len"]) == 0
  assert filled["video"].dtype == np.float32 and not filled["video"].any()
