"""Karpathy-split retrieval: the reader, R@K against brute force, and `crucible retrieval` on a converted open_clip."""

import json

import numpy as np
import pytest
from PIL import Image

from crucible_jax.cli import main
from crucible_jax.data.formats.karpathy import read_karpathy
from crucible_jax.eval.karpathy import retrieval_recalls
from test_interop import reference, save_safetensors, tiny_open_clip

WORDS = ("a red square", "two dogs", "a cat on a mat", "the sea", "green", "an old car", "snow", "a tall tree")


def _brute_recalls(image_emb, text_emb, caption_image, ks=(1, 5, 10)):
  """Loops over every query: its rank is the number of candidates scoring strictly higher than its best match."""
  sim = [[float(np.dot(i, t) / np.linalg.norm(i) / np.linalg.norm(t)) for t in text_emb] for i in image_emb]
  out = {}
  for k in ks:
    i2t = [min(sum(s > row[c] for s in row) for c, owner in enumerate(caption_image) if owner == i) < k
           for i, row in enumerate(sim)]
    t2i = [sum(sim[j][c] > sim[owner][c] for j in range(len(sim))) < k for c, owner in enumerate(caption_image)]
    out[f"image_to_text/R@{k}"], out[f"text_to_image/R@{k}"] = float(np.mean(i2t)), float(np.mean(t2i))
  return out


def _write_split(root, num_images=6, seed=0, flickr=False):
  """A dataset_*.json with `num_images` test images (5-7 captions) and one train image, and their PNGs."""
  rng = np.random.default_rng(seed)
  entries = []
  for i in range(num_images + 1):
    sub = "" if flickr else ("val2014" if i % 2 else "train2014")
    (root / "images" / sub).mkdir(parents=True, exist_ok=True)
    name = f"{i:04d}.png" if flickr else f"COCO_{sub}_{i:012d}.png"
    Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), np.uint8)).save(root / "images" / sub / name)
    captions = [f"{WORDS[(i + j) % len(WORDS)]} number {i}-{j}" for j in range(5 + i % 3)]
    entry = {"filename": name, "split": "train" if i == num_images else "test", "imgid": i,
             "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    entries.append(entry if flickr else {"filepath": sub, **entry})
  (root / "dataset.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k" if flickr else "coco"}))
  return root / "dataset.json", root / "images"


def test_reader_keeps_five_captions_and_paths(tmp_path):
  path, images = _write_split(tmp_path)
  split = read_karpathy(path, images, "test")
  assert split.dataset == "coco" and len(split.images) == 6 and len(split.captions) == 30
  assert split.images[1] == str(images / "val2014" / "COCO_val2014_000000000001.png")
  assert split.captions[5:7] == ("two dogs number 1-0", "a cat on a mat number 1-1")
  assert split.caption_image.tolist() == [i for i in range(6) for _ in range(5)]
  assert len(read_karpathy(path, images, "test", None).captions) == 5 + 6 + 7 + 5 + 6 + 7
  flickr_path, flickr_images = _write_split(tmp_path / "f", flickr=True)
  assert read_karpathy(flickr_path, flickr_images, "train").images == (str(flickr_images / "0006.png"),)


def test_recalls_match_brute_force():
  rng = np.random.default_rng(3)
  images, texts = rng.normal(size=(12, 4)), rng.normal(size=(60, 4))
  owners = np.repeat(np.arange(12), 5)
  got = retrieval_recalls(images, texts, owners)
  expected = _brute_recalls(images, texts, owners)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0 < got["text_to_image/R@1"] < got["text_to_image/R@5"] < 1


def test_malformed_files_and_missing_images_are_named(tmp_path):
  path, images = _write_split(tmp_path)
  data = json.loads(path.read_text())
  with pytest.raises(ValueError, match=r"has no image in split 'tset'; its splits are \['test', 'train'\]"):
    read_karpathy(path, images, "tset")
  del data["images"][2]["sentences"][1]["raw"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"images\[2\].sentences\[1\] has no 'raw' str field"):
    read_karpathy(path, images)
  data["images"][2]["sentences"] = [s for s in data["images"][2]["sentences"] if "raw" in s][:3]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"images\[2\] \(COCO_train2014_000000000002.png\) has 3 captions"):
    read_karpathy(path, images)
  path.write_text('{"images": [')
  with pytest.raises(ValueError, match="dataset.json is not a JSON file"):
    read_karpathy(path, images)
  path, images = _write_split(tmp_path / "again")
  (images / "val2014" / "COCO_val2014_000000000003.png").unlink()
  with pytest.raises(FileNotFoundError, match="1 image.*COCO_val2014_000000000003.png"):
    read_karpathy(path, images)


def test_crucible_retrieval_on_converted_open_clip_equals_brute_force(tmp_path, capsys):
  import torch
  model = tiny_open_clip()
  save_safetensors(model, tmp_path / "model.safetensors")
  assert main(["convert", "--from", "open_clip", "--checkpoint", str(tmp_path / "model.safetensors"),
               "--out", str(tmp_path / "clip")]) == 0
  path, images = _write_split(tmp_path, num_images=12)
  assert main(["retrieval", "--params", str(tmp_path / "clip"), "--karpathy", str(path), "--images", str(images),
               "--batch", "8", "--json", str(tmp_path / "r.json")]) == 0
  got = json.loads((tmp_path / "r.json").read_text())
  split = read_karpathy(path, images)
  open_clip = reference("open_clip")
  preprocess = open_clip.image_transform(32, is_train=False)
  with torch.no_grad():
    image_ref = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in split.images])).numpy()
    text_ref = model.encode_text(open_clip.tokenize(list(split.captions), 16)).numpy()
  expected = _brute_recalls(image_ref, text_ref, split.caption_image)
  assert {k.removeprefix("test/coco_"): v for k, v in got.items() if "/R@" in k} == pytest.approx(expected)
  assert got["test/coco/images"] == 12 and got["test/coco/captions"] == 60
  assert 0 < got["test/coco_text_to_image/R@1"] < got["test/coco_text_to_image/R@10"] < 1  # not a trivial ranking
  capsys.readouterr()
  (images / "val2014" / "COCO_val2014_000000000003.png").unlink()
  assert main(["retrieval", "--params", str(tmp_path / "clip"), "--karpathy", str(path), "--images", str(images),
               "--json", str(tmp_path / "x.json")]) == 1
  assert "COCO_val2014_000000000003.png" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
