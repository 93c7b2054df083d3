"""`crucible convert` then `crucible embed` on PNG files and strings give open_clip's own preprocess + encode."""

import json

import numpy as np
import pytest
from PIL import Image

from crucible_jax.cli import main
from test_interop import TOL, reference, save_safetensors, tiny_open_clip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(open_clip model, converted params dir, three PNGs: RGB landscape, grey portrait, RGBA square)."""
  tmp = tmp_path_factory.mktemp("embed")
  model = tiny_open_clip()
  save_safetensors(model, tmp / "model.safetensors")
  assert main(["convert", "--from", "open_clip", "--checkpoint", str(tmp / "model.safetensors"),
               "--out", str(tmp / "out")]) == 0
  rng = np.random.default_rng(0)
  pngs = [tmp / "wide.png", tmp / "tall.png", tmp / "alpha.png"]
  Image.fromarray(rng.integers(0, 256, (45, 71, 3), np.uint8)).save(pngs[0])
  Image.fromarray(rng.integers(0, 256, (90, 37), np.uint8)).save(pngs[1])
  Image.fromarray(rng.integers(0, 256, (32, 32, 4), np.uint8)).save(pngs[2])
  return model, tmp / "out", pngs


def test_embed_matches_open_clip(converted, tmp_path):
  import torch
  model, out, pngs = converted
  open_clip = reference("open_clip")
  texts = ["a photo of a cat", "Two DOGS!"]
  assert main(["embed", "--params", str(out), "--images", *map(str, pngs), "--texts", *texts,
               "--json", str(tmp_path / "e.json")]) == 0
  got = json.loads((tmp_path / "e.json").read_text())
  assert sorted(got) == ["image", "text"] and len(got["image"]) == 3 and len(got["text"]) == 2
  preprocess = open_clip.image_transform(32, is_train=False)
  with torch.no_grad():
    image_ref = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in pngs]), normalize=True).numpy()
    text_ref = model.encode_text(open_clip.tokenize(texts, 16), normalize=True).numpy()
  image_diff = np.abs(np.asarray(got["image"]) - image_ref).max()
  text_diff = np.abs(np.asarray(got["text"]) - text_ref).max()
  assert image_diff <= TOL and text_diff <= TOL, (image_diff, text_diff)


def test_embed_names_bad_inputs(converted, tmp_path, capsys):
  _, out, pngs = converted
  assert main(["embed", "--params", str(out), "--json", str(tmp_path / "e.json")]) == 2
  assert "nothing to embed" in capsys.readouterr().err
  assert main(["embed", "--params", str(out), "--images", str(pngs[0]), str(tmp_path / "nope.png"),
               "--json", str(tmp_path / "e.json")]) == 1
  assert "nope.png" in capsys.readouterr().err
  assert main(["embed", "--params", str(out), "--audio", str(pngs[0]), "--json", str(tmp_path / "e.json")]) == 1
  assert "no 'audio' encoder" in capsys.readouterr().err
  assert main(["convert", "--from", "open_clip", "--checkpoint", str(tmp_path / "none.safetensors"),
               "--out", str(tmp_path / "o")]) == 1
  assert "checkpoint not found" in capsys.readouterr().err
  assert not (tmp_path / "e.json").exists()
