"""Real-benchmark experiments on tiny fixtures in the official layouts: configs, batches, missing data, one run."""

import json
import os
import pathlib
import re

import jax
import numpy as np
import pytest
import soundfile
from PIL import Image

from crucible_jax import cli
from crucible_jax.config import load_experiment
from crucible_jax.data import benchmarks, registry, schema
from crucible_jax.data.tokenizers.byte import ByteTokenizer
from crucible_jax.eval.evaluators import TaggingEvaluator, VqaEvaluator
from crucible_jax.models import build_model
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.train import objectives
from crucible_jax.train.loop import Trainer
from crucible_jax.train.setup import Experiment

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"
NAMES = ("coco_retrieval", "vqa_v2", "audioset", "video_text", "librispeech")


def _image(path, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pathlib.Path(path).write_text(json.dumps(data))


def _audio(path, seconds, seed) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wave = np.random.default_rng(seed).uniform(-0.5, 0.5, int(16000 * seconds))
  soundfile.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")


def make_coco(root):
  """train2017: 6 images × 2 captions; val2017: 4 images × 2 captions."""
  for split, count in (("train2017", 6), ("val2017", 4)):
    images = [{"id": 100 + k, "file_name": f"{k:012d}.png"} for k in range(count)]
    for k in range(count):
      _image(root / split / f"{k:012d}.png", 40 * k)
    captions = [{"image_id": 100 + k, "caption": f"{word} number {k}"} for k in range(count) for word in ("a", "b")]
    _json(root / "annotations" / f"captions_{split}.json", {"images": images, "annotations": captions})


def make_vqa(root):
  """8 questions per split; answers from {yes, no, 2}; val question 3's humans include an unseen answer."""
  for split in ("train2014", "val2014"):
    questions, annotations = [], []
    for k in range(8):
      answer = ("yes", "no", "2")[k % 3]
      humans = [answer] * 7 + ["purple" if k == 3 else answer] * 3
      questions.append({"image_id": k, "question": f"question {k}?", "question_id": 10 * k})
      annotations.append({"question_id": 10 * k, "multiple_choice_answer": answer,
                          "answer_type": "number" if answer == "2" else "yes/no",
                          "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(humans)]})
      _image(root / split / f"COCO_{split}_{k:012d}.jpg", 30 * k)
    _json(root / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": questions})
    _json(root / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations})


def make_audioset(root):
  """3 classes; 8 train and 5 eval segments, one of them without audio (skipped)."""
  os.makedirs(root, exist_ok=True)
  (root / "class_labels_indices.csv").write_text('index,mid,display_name\n0,/m/a,"Speech"\n1,/m/b,"Music"\n'
                                                  '2,/t/c,"Dog, bark"\n')
  for csv, count in (("balanced_train_segments.csv", 8), ("eval_segments.csv", 5)):
    rows = [f'{csv[:4]}{k}, 0.000, 1.000, "{("/m/a", "/m/b", "/m/a,/t/c")[k % 3]}"' for k in range(count)]
    (root / csv).write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(rows) + "\n")
    for k in range(count - 1):  # the last segment's video is "unavailable"
      _audio(root / "audio" / f"{csv[:4]}{k}.wav", 1.0, k)


def make_msrvtt(root):
  """train: 5 videos × 2 captions (+1 validate video); test: 3 videos × 2 captions; 3 frames each."""
  for name, split, count in (("train_val_videodatainfo.json", "train", 6), ("test_videodatainfo.json", "test", 3)):
    ids = [f"{split}{k}" for k in range(count)]
    videos = [{"video_id": v, "split": "validate" if split == "train" and k == 5 else split}
              for k, v in enumerate(ids)]
    sentences = [{"video_id": v, "caption": f"{word} clip {v}"} for v in ids for word in ("one", "two")]
    _json(root / name, {"videos": videos, "sentences": sentences})
    for k, v in enumerate(ids):
      for f in range(3):
        _image(root / "frames" / v / f"{f:05d}.jpg", 20 * k + f)


def make_librispeech(root):
  """train-clean-100: 8 utterances of 2 speakers; test-clean: 3 utterances."""
  for subset, count in (("train-clean-100", 8), ("test-clean", 3)):
    for k in range(count):
      speaker, chapter = str(10 + k % 2), "7"
      folder = root / subset / speaker / chapter
      uttid = f"{speaker}-{chapter}-{k:04d}"
      _audio(folder / f"{uttid}.flac", 0.5, k)
      with open(folder / f"{speaker}-{chapter}.trans.txt", "a", encoding="utf-8") as f:
        f.write(f"{uttid} WORDS OF UTTERANCE {k}\n")


FIXTURES = {"coco_retrieval": make_coco, "vqa_v2": make_vqa, "audioset": make_audioset, "video_text": make_msrvtt,
            "librispeech": make_librispeech}
TINY = {"audioset": ["--config.data.num_labels=3", "--config.model.heads.num_tags=3"]}
EVAL_SPLIT = {"vqa_v2": "val", "librispeech": "test_clean"}
REAL_EVAL = {"coco_retrieval": 4 + 8, "vqa_v2": 8, "audioset": 4, "video_text": 3 + 6, "librispeech": 3}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  out = {}
  for name, make in FIXTURES.items():
    out[name] = tmp_path_factory.mktemp(name)
    make(out[name])
  return out


def _tiny(name, root, extra=()):
  return load_experiment(f"{EXPERIMENTS / name}.py:tiny", [f"--config.data.root={root}", *TINY.get(name, []),
                                                           *extra])


@pytest.mark.parametrize("name", NAMES)
def test_tiny_variant_parses_validates_and_builds(name):
  config = load_experiment(f"{EXPERIMENTS / name}.py:tiny", TINY.get(name, []))
  build_model(config.model)
  assert config.data.name in benchmarks.BENCHMARKS and config.data.splits.train


def test_default_root_comes_from_the_environment(monkeypatch):
  monkeypatch.setenv(benchmarks.BENCHMARKS_ENV, "/data/sets")
  assert load_experiment(f"{EXPERIMENTS / 'coco_retrieval'}.py").data.root == "/data/sets/coco"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_batches_follow_the_schema(name, roots):
  config = _tiny(name, roots[name])
  keys = schema.example_batch(config.data, 1)
  train = registry.make_train_iterator(config.data, global_batch=8, seed=0, process_index=0, process_count=1)
  for batch in (next(train), next(train)):
    schema.check_batch(batch, required=tuple(keys))
    assert batch.keys() == keys.keys() and (batch["weight"] == 1).all()
    assert all(batch[k].shape[1:] == keys[k].shape[1:] for k in keys)
  split = EVAL_SPLIT.get(name, "test")
  batches = list(registry.make_eval_batches(config.data, split, batch_size=8, process_index=0, process_count=1))
  for batch in batches:
    schema.check_batch(batch, required=tuple(keys))
  merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = merged["weight"] > 0
  assert real.sum() == REAL_EVAL[name] == registry.num_examples(config.data, split) and real[:real.sum()].all()
  assert (merged["digits"] == -1).all() and not merged["image_present"][~real].any()


def test_train_shards_cover_an_epoch_once_and_resume_exactly(roots):
  data = _tiny("coco_retrieval", roots["coco_retrieval"]).data
  seen = []
  for process in range(2):  # 12 pairs, 2 processes × 4 per batch: the first 6 of each process are one epoch
    iterator = registry.make_train_iterator(data, global_batch=8, seed=3, process_index=process, process_count=2)
    batches = [next(iterator), next(iterator)]
    seen += [(int(i), ByteTokenizer(1).decode(t)) for b in batches for i, t in zip(b["string_id"], b["text"])][:6]
  assert len(set(seen)) == 12 and {i for i, _ in seen} == set(range(100, 106))
  iterator = registry.make_train_iterator(data, global_batch=8, seed=3, process_index=0, process_count=1)
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = registry.make_train_iterator(data, global_batch=8, seed=3, process_index=0, process_count=1)
  restored.set_state(state)
  for batch, other in zip(expected, [next(restored) for _ in range(2)]):
    assert all(np.array_equal(batch[k], other[k]) for k in batch)


def test_coco_eval_lists_each_image_once_and_each_caption_once(roots):
  config = _tiny("coco_retrieval", roots["coco_retrieval"])
  batch = {k: np.concatenate([b[k] for b in registry.make_eval_batches(config.data, "test", batch_size=8,
                                                                         process_index=0, process_count=1)])
           for k in schema.BATCH_SCHEMA}
  images, captions = slice(0, 4), slice(4, 12)
  assert batch["image_present"][images].all() and not batch["text_present"][images].any()
  assert batch["text_present"][captions].all() and not batch["image_present"][captions].any()
  assert (batch["text"][images] == 0).all() and (batch["image"][captions] == 0).all()
  assert list(batch["string_id"][images]) == [100, 101, 102, 103]
  assert sorted(batch["string_id"][captions]) == [100, 100, 101, 101, 102, 102, 103, 103]
  assert ByteTokenizer(1).decode(batch["text"][4]) == "a number 0"


def test_vqa_answers_and_audioset_labels(roots):
  vqa = _tiny("vqa_v2", roots["vqa_v2"]).data
  batch = next(iter(registry.make_eval_batches(vqa, "val", batch_size=8, process_index=0, process_count=1)))
  vocab = benchmarks.open_split(vqa, "train").source.answer_vocab
  assert batch["answers"].shape == (8, 10) and list(batch["answers"][0]) == [vocab.index("yes")] * 10
  assert list(batch["answers"][3]) == [vocab.index("yes")] * 7 + [benchmarks.OUT_OF_VOCAB] * 3
  audio = _tiny("audioset", roots["audioset"]).data
  batch = next(iter(registry.make_eval_batches(audio, "test", batch_size=8, process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["labels"][:3], [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
  assert batch["labels"].dtype == np.float32 and not batch["labels"][4:].any()
  with pytest.raises(ValueError, match="num_labels=527"):
    benchmarks.open_split(_tiny("audioset", roots["audioset"], ["--config.data.num_labels=527"]).data, "test")


@pytest.mark.parametrize("name", NAMES)
def test_missing_directory_names_path_and_layout(name, tmp_path):
  config = _tiny(name, tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match=r"(?s)absent.*Layout under `root`"):
    registry.make_train_iterator(config.data, global_batch=8, seed=0, process_index=0, process_count=1)


def test_cli_train_fails_fast_on_missing_data(tmp_path, monkeypatch, capsys):
  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before checking the data")
  monkeypatch.setattr(Experiment, "init_params", no_compiling)
  monkeypatch.setattr(Experiment, "train_step", no_compiling)
  status = cli.main(["train", "--config", f"{EXPERIMENTS / 'coco_retrieval'}.py:tiny", "--workdir", str(tmp_path / "w"),
                     f"--config.data.root={tmp_path / 'nowhere'}"])
  assert status == 1
  assert re.search(r"(?s)nowhere.*annotations/captions_\{split\}\.json", capsys.readouterr().err)


def test_vqa_soft_accuracy_and_tagging_labels():
  vqa = VqaEvaluator()
  humans = np.full((3, 10), -1, np.int32)
  humans[0] = [0] * 7 + [1] * 3  # 7 of 10 said the prediction: 1.0
  humans[1] = [1] + [benchmarks.OUT_OF_VOCAB] * 9  # 1 of 10: 0.3 (official leave-one-out)
  vqa.update({"vqa_logits": np.eye(3)[[0, 1, 2]]},  # row 2 has no human answers: exact match with `answer`
             {"answer": np.array([1, 1, 2]), "question_type": np.zeros(3, int), "weight": np.ones(3), "answers": humans})
  assert vqa.result()["vqa/accuracy"] == pytest.approx((1.0 + 0.3 + 1.0) / 3)
  tagging = TaggingEvaluator()
  labels = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], np.float32)
  logits = np.array([[5.0, -5, -5, 0], [-5, 5, 5, 0]])
  tagging.update({"tag_logits": logits}, {"labels": labels, "weight": np.ones(2)})
  assert tagging.result()["tagging/mAP"] == pytest.approx(1.0)
  _, objective = objectives.build_objective({"tagging": 1.0})
  logits = np.array([[2.0, -1.0, 0.5, 30.0]], np.float32)
  loss, _ = objective({"tag_logits": logits}, {"labels": labels[:1], "weight": np.ones(1, np.float32)})
  expected = np.mean(np.log1p(np.exp(-np.abs(logits))) + np.maximum(logits, 0) - logits * labels[:1])
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_coco_trains_end_to_end_and_writes_recall(roots, tmp_path):
  config = _tiny("coco_retrieval", roots["coco_retrieval"], ["--config.mesh.data=2"])
  # Two devices keep the batch sharded while compiling ~25% faster than eight (DigitWorld's tests cover eight).
  trainer = Trainer(config, tmp_path, mesh=build_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2]))
  try:
    trainer.run()
  finally:
    trainer.close()
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["steps"] == 3 and 0.0 <= results["test/image_to_text/R@1"] <= 1.0
  assert 0.0 <= results["test/text_to_image/R@1"] <= results["test/text_to_image/R@5"] <= 1.0
