"""Zero-shot classification: the classifier and accuracy against brute force, DigitWorld's tasks, `crucible zeroshot`."""

import json

import numpy as np
import pytest
from PIL import Image

from crucible_jax import inference
from crucible_jax.cli import main
from crucible_jax.data import registry
from crucible_jax.data.digit_world import zero_shot as tasks
from crucible_jax.data.tokenizers import tokenizer_of
from crucible_jax.eval import zero_shot
from serve_fixtures import tiny_params_dir


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _fake_embed(texts):
  """A deterministic vector per string (seeded by its bytes), of varying norm."""
  return np.stack([np.random.default_rng(list(t.encode()) or [0]).normal(size=8) * (1 + len(t)) for t in texts])


def _brute_top(vectors, weights, labels, k):
  """Fraction of rows whose label has fewer than k classes scoring strictly higher (no ties with random data)."""
  hits = 0
  for v, label in zip(vectors, labels):
    scores = [float(np.dot(v, w) / np.linalg.norm(v) / np.linalg.norm(w)) for w in weights]
    hits += sum(s > scores[label] for s in scores) < k
  return hits / len(labels)


def test_classifier_is_the_normalised_mean_of_normalised_prompts():
  names, templates = ["cat", "dog", "a bird"], ["{}", "a photo of a {}.", "{}!"]
  got = zero_shot.classifier(_fake_embed, names, templates)
  for name, row in zip(names, got):
    prompts = [t.format(name) for t in templates]
    expected = _unit(np.mean([_unit(v) for v in _fake_embed(prompts)], axis=0))
    np.testing.assert_allclose(row, expected, atol=1e-12)


def test_topk_accuracy_matches_brute_force():
  rng = np.random.default_rng(1)
  vectors, weights, labels = rng.normal(size=(50, 6)), _unit(rng.normal(size=(9, 6))), rng.integers(0, 9, 50)
  got = zero_shot.topk_accuracy(vectors, weights, labels, ks=(1, 3, 5))
  assert got == pytest.approx({f"top{k}": _brute_top(vectors, weights, labels, k) for k in (1, 3, 5)})
  assert 0 < got["top1"] < got["top3"] < got["top5"] < 1


def test_bad_classes_and_templates_are_named():
  with pytest.raises(ValueError, match="'a photo'.*exactly one"):
    zero_shot.classifier(_fake_embed, ["cat"], ["a photo"])
  with pytest.raises(ValueError, match="'cat' appears more than once"):
    zero_shot.classifier(_fake_embed, ["cat", "dog", "cat"], ["{}"])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    zero_shot.topk_accuracy(np.ones((2, 3)), np.ones((2, 3)), np.array([0, 2]))


def test_digit_world_tasks_label_digits_and_strings():
  digits = np.array([[7, -1, -1], [3, 7, 1], [0, -1, -1], [3, 7, 1], [0, 7, -1]])
  num_digits = np.array([1, 3, 1, 3, 2])
  one = tasks.single_digits(digits, num_digits)
  assert one.class_names[7] == "seven" and len(one.class_names) == 10
  assert one.keep.tolist() == [True, False, True, False, False] and one.labels.tolist() == [7, 0]
  strings = tasks.whole_strings(digits, num_digits)
  assert strings.class_names == ("zero", "seven", "zero seven", "three seven one")  # by string id: "07" after "7"
  assert strings.labels.tolist() == [1, 3, 0, 3, 2]
  with pytest.raises(ValueError, match="unknown DigitWorld zero-shot task 'nope'"):
    tasks.task_of("nope")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_params_dir(tmp_path_factory.mktemp("zero_shot") / "params")


def test_zeroshot_digit_world_equals_a_hand_computed_classifier(model_dir, tmp_path):
  out = tmp_path / "z.json"
  assert main(["zeroshot", "--params", str(model_dir), "--data", "digit_world", "--task", "string",
               "--modalities", "image", "audio", "--json", str(out)]) == 0
  got = json.loads(out.read_text())
  model = inference.load(model_dir)
  batches = list(registry.make_eval_batches(model.config.data, "test", batch_size=64))
  real = np.concatenate([b["weight"] > 0 for b in batches])
  strings = [tuple(int(d) for d in row[:n]) for b in batches for row, n in zip(b["digits"], b["num_digits"])]
  strings = [s for s, r in zip(strings, real) if r]
  classes = sorted(set(strings), key=lambda s: (len(s), s))  # DigitWorld's string id order: shorter first
  names = [" ".join(("zero one two three four five six seven eight nine".split())[d] for d in s) for s in classes]
  tokenizer = tokenizer_of(model.config.data)
  prompt_vectors = model.embed("text", {"text": np.stack([tokenizer.encode(t.replace("{}", n))
                                                         for n in names for t in tasks.TEMPLATES])})
  weights = _unit(_unit(prompt_vectors).reshape(len(names), len(tasks.TEMPLATES), -1).mean(axis=1))
  labels = [classes.index(s) for s in strings]
  for modality, keys in (("image", ("image",)), ("audio", ("audio", "audio_len"))):
    vectors = np.concatenate([model.embed(modality, {k: b[k] for k in keys}) for b in batches])[real]
    for k in (1, 5):
      assert got[f"test/zero_shot_string/{modality}_top{k}"] == pytest.approx(
          _brute_top(vectors, weights, labels, k), abs=1e-9)
  assert got["test/zero_shot_string/image_count"] == real.sum() and got["test/zero_shot_string/classes"] == len(names)


def test_zeroshot_on_class_folders_equals_crucible_embed(model_dir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  files = []
  for folder in ("n02", "n01", "n03"):  # sorted folder order: n01, n02, n03
    (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(2):
      files.append(tmp_path / "data" / folder / f"{i}.png")
      Image.fromarray(rng.integers(0, 256, (20, 30), np.uint8)).save(files[-1])
  (tmp_path / "classes.txt").write_text("one\ntwo\nthree\n")
  (tmp_path / "templates.txt").write_text("digits: {}\n\nthe number {}\n")
  assert main(["zeroshot", "--params", str(model_dir), "--data", str(tmp_path / "data"), "--classes",
               str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"), "--split", "mine",
               "--json", str(tmp_path / "z.json")]) == 0
  got = json.loads((tmp_path / "z.json").read_text())
  assert "mine/zero_shot/audio_top1" not in got  # no WAVs in the folders
  files = sorted(files)
  prompts = [t.format(n) for n in ("one", "two", "three") for t in ("digits: {}", "the number {}")]
  assert main(["embed", "--params", str(model_dir), "--images", *map(str, files), "--texts", *prompts,
               "--json", str(tmp_path / "e.json")]) == 0
  ref = json.loads((tmp_path / "e.json").read_text())
  weights = _unit(np.asarray(ref["text"]).reshape(3, 2, -1).mean(axis=1))
  labels = [["n01", "n02", "n03"].index(f.parent.name) for f in files]
  assert got["mine/zero_shot/image_top1"] == pytest.approx(_brute_top(np.asarray(ref["image"]), weights, labels, 1))
  assert got["mine/zero_shot/image_count"] == 6 and got["mine/zero_shot/templates"] == 2
  capsys.readouterr()
  (tmp_path / "bad.txt").write_text("a photo\n")
  assert main(["zeroshot", "--params", str(model_dir), "--data", str(tmp_path / "data"), "--templates",
               str(tmp_path / "bad.txt"), "--json", str(tmp_path / "x.json")]) == 1
  assert "'a photo' must contain exactly one '{}'" in capsys.readouterr().err
  (tmp_path / "two.txt").write_text("one\ntwo\n")
  assert main(["zeroshot", "--params", str(model_dir), "--data", str(tmp_path / "data"), "--classes",
               str(tmp_path / "two.txt"), "--json", str(tmp_path / "x.json")]) == 1
  assert "--classes names 2 classes but" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists()
