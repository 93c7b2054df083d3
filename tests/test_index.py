"""`crucible index`: a DigitWorld split embedded with its payloads, searched exactly and through FAISS, extended."""

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from crucible_jax import cli
from crucible_jax.serve.artifact import ExportDir
from crucible_jax.serve.store import Index
from serve_fixtures import tiny_params_dir

SPLIT_SIZE = 128  # the tiny config's test split


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("index")
  params = tiny_params_dir(root / "params")
  assert cli.main(["index", "--workdir", str(params), "--data", "digit_world:test", "--out", str(root / "idx")]) == 0
  return root


def test_every_modality_indexed_with_payloads(built):
  index = Index.open(built / "idx")
  assert len(index) == 4 * SPLIT_SIZE and index.modalities() == ("audio", "image", "text", "video")
  by_modality = {}
  for item_id in range(len(index)):
    item = index.item(item_id)
    by_modality.setdefault(item["modality"], []).append(item)
  image, audio, text = by_modality["image"][5], by_modality["audio"][5], by_modality["text"][5]
  assert Image.open(io.BytesIO(image["payload"])).size == (64, 16)  # (width, height) of data.image_size
  waveform, rate = soundfile.read(io.BytesIO(audio["payload"]))
  assert rate == 8000 and 0 < len(waveform) <= 32000
  assert text["text"].strip() and text["payload"] is None and text["mime"].startswith("text/plain")
  assert image["source"] == "digit_world:test" and image["source_row"] == text["source_row"] == 5
  assert image["label"] == text["label"] == audio["label"]  # one sample's items share its string id
  assert index.item(10**6) is None


def test_exact_search_finds_each_vector_itself(built):
  index = Index.open(built / "idx")
  export = ExportDir(index.export_dir)
  image_ids = [i for i in range(len(index)) if index.item(i)["modality"] == "image"][:3]
  queries = index._vectors[image_ids]
  hits = index.search(queries, ["image"], k=5)
  assert [h[0].id for h in hits] == image_ids
  assert all(abs(h[0].score - 1.0) < 1e-5 and h[0].modality == "image" for h in hits)
  assert all(h.modality in ("text", "audio") for h in index.search(queries[0], ["text", "audio"], k=7)[0])
  assert export.manifest["joint_dim"] == index.dim


def test_append_and_reopen(built, capsys):
  out = str(built / "idx")
  assert cli.main(["index", "--data", "digit_world:val", "--out", out, "--append"]) == 0
  index = Index.open(out)
  assert len(index) == 4 * SPLIT_SIZE + 4 * 64  # the tiny val split: 64 samples
  new = index.item(len(index) - 1)
  assert new["source"] == "digit_world:val"
  assert index.search(index._vectors[-1], [new["modality"]], k=1)[0][0].id == len(index) - 1
  assert cli.main(["index", "--data", "digit_world:test", "--out", out]) == 1
  assert "not empty" in capsys.readouterr().err


def test_bad_sources_and_arguments(built, tmp_path, capsys):
  assert cli.main(["index", "--export", str(built / "idx" / "export"), "--data", "coco:test",
                   "--out", str(tmp_path / "a")]) == 1
  assert "unknown data source 'coco:test'" in capsys.readouterr().err
  assert cli.main(["index", "--export", str(built / "idx" / "export"), "--data", "digit_world:nope",
                   "--out", str(tmp_path / "b")]) == 1
  assert "not 'nope'" in capsys.readouterr().err
  assert cli.main(["index", "--data", "digit_world:test", "--out", str(tmp_path / "c")]) == 1
  assert "exactly one of --workdir" in capsys.readouterr().err


def test_faiss_matches_exact_search_with_every_list_probed(tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((50, 16))
  vectors = centers[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, 16))
  vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
  index = Index.create(tmp_path / "synthetic", 16)
  index.add("image", vectors, [{} for _ in vectors])
  queries = vectors[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32)
  exact = index.search(queries, ["image"], k=10)
  everything = index.search(queries, ["image"], k=10, approximate=True, nprobe=10**6)
  assert [[h.id for h in q] for q in everything] == [[h.id for h in q] for q in exact]
  few = index.search(queries, ["image"], k=10, approximate=True, nprobe=1)
  assert [[h.id for h in q] for q in few] != [[h.id for h in q] for q in exact]  # one list of many: approximate


def test_damaged_index_is_named(tmp_path):
  index = Index.create(tmp_path / "d", 4)
  index.add("text", np.eye(4, dtype=np.float32)[:2], [{"text": "a"}, {"text": "b"}])
  index.close()
  next((tmp_path / "d" / "vectors").glob("*.npy")).unlink()
  with pytest.raises(ValueError, match="2 items but only 0 vectors"):
    Index.open(tmp_path / "d")
