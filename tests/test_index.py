"""`crucible index`: a DigitWorld split and an own-data collection embedded with their payloads, searched exactly and
through FAISS, extended."""

import collections
import io
import json
import pathlib

import numpy as np
import pytest
import soundfile
from PIL import Image

from crucible_jax import cli
from crucible_jax.data.own.demo import write_demo_collection
from crucible_jax.serve import preprocess
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


@pytest.fixture(scope="module")
def own(tmp_path_factory):
  """A 6-record demo collection (image, audio, two captions each) plus a video-only record of 3 frames."""
  root = tmp_path_factory.mktemp("own")
  files = write_demo_collection(root, count=6, shard_size=3, image_px=24)
  (root / "clip").mkdir()
  for f in range(3):
    Image.fromarray(np.full((20, 20, 3), 80 * f, np.uint8)).save(root / "clip" / f"{f}.png")
  with open(files["manifest"], "a") as f:
    f.write(json.dumps({"video": "clip", "text": "a fading square"}) + "\n")
  return files


def test_own_manifest_indexes_every_modality_with_the_models_preprocessing(built, own, tmp_path):
  export_dir = built / "idx" / "export"
  assert cli.main(["index", "--export", str(export_dir), "--data", f"manifest:{own['manifest']}",
                   "--out", str(tmp_path / "own")]) == 0
  index, export = Index.open(tmp_path / "own"), ExportDir(export_dir)
  items = [index.item(i) for i in range(len(index))]
  assert sorted(collections.Counter(it["modality"] for it in items).items()) == [
      ("audio", 6), ("image", 6), ("text", 13), ("video", 1)]  # every caption is an item
  root = pathlib.Path(own["manifest"]).parent
  image = next(it for it in items if it["modality"] == "image" and it["source_row"] == 3)
  assert image["path"] == str(root / "images" / "00003.png") and image["mime"] == "image/png"
  assert image["payload"] == (root / "images" / "00003.png").read_bytes()
  # The model's eval preprocessing: centre crop to its 16x64 aspect, bicubic, grayscale in [0, 1].
  png = Image.open(root / "images" / "00003.png").convert("L")
  pixels = np.asarray(png.resize((64, 16), Image.Resampling.BICUBIC, box=(0, 9, 24, 15)), np.float32) / 255.0
  np.testing.assert_allclose(index._vectors[image["id"]], export.embed("image", {"image": pixels[None, ..., None]})[0],
                             atol=1e-5)
  _, query = preprocess.file_inputs(image["payload"], export.manifest["preprocessing"])  # a served query: the same
  np.testing.assert_allclose(export.embed("image", query)[0], index._vectors[image["id"]], atol=1e-5)
  captions = [it for it in items if it["modality"] == "text" and it["source_row"] == 3]
  assert [c["text"] for c in captions] == json.loads(open(own["manifest"]).readlines()[3])["text"]
  assert captions[0]["path"] == f"{own['manifest']}:line 4"
  tokens = preprocess.text_inputs(captions[1]["text"], export.manifest["preprocessing"]["text"])
  np.testing.assert_allclose(index._vectors[captions[1]["id"]], export.embed("text", tokens)[0], atol=1e-5)
  audio = next(it for it in items if it["modality"] == "audio")
  assert audio["mime"] == "audio/wav" and audio["payload"] == pathlib.Path(audio["path"]).read_bytes()
  video = next(it for it in items if it["modality"] == "video")
  assert video["source_row"] == 6 and Image.open(io.BytesIO(video["payload"])).n_frames == 3
  hits = index.search(export.embed("text", tokens), ["image", "text"], k=3)[0]
  assert hits[0].id == captions[1]["id"] and len(hits) == 3


def test_own_shards_append_the_same_vectors(built, own, tmp_path):
  out = str(tmp_path / "both")
  assert cli.main(["index", "--export", str(built / "idx" / "export"), "--data", f"manifest:{own['csv']}",
                   "--out", out]) == 0
  assert cli.main(["index", "--data", f"shards:{own['shards']}", "--out", out, "--append"]) == 0
  index = Index.open(out)
  items = [index.item(i) for i in range(len(index))]
  csv_image, shard_image = (next(it for it in items if it["modality"] == "image" and it["source_row"] == 4
                                 and it["source"] == source) for source in (f"manifest:{own['csv']}",
                                                                            f"shards:{own['shards']}"))
  assert shard_image["path"].endswith("shard-00001.tar#00004") and shard_image["payload"] == csv_image["payload"]
  np.testing.assert_allclose(index._vectors[shard_image["id"]], index._vectors[csv_image["id"]], atol=1e-6)


def test_own_data_errors_name_the_culprit(built, own, tmp_path, capsys):
  export = str(built / "idx" / "export")
  (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
  good = json.dumps({"image": str(pathlib.Path(own["manifest"]).parent / "images" / "00000.png"), "text": "ok"})
  for name, row in (("missing", {"image": "gone.png"}), ("corrupt", {"image": "junk.png"})):
    (tmp_path / f"{name}.jsonl").write_text(good + "\n" + json.dumps(row) + "\n")
  for data, message in ((f"manifest:{tmp_path}/none.jsonl", "none.jsonl"),
                        (f"shards:{tmp_path}/*.tar", "matches no file"),
                        (f"manifest:{tmp_path}/missing.jsonl", "'line 2': missing_file: image"),
                        (f"manifest:{tmp_path}/corrupt.jsonl", "'line 2': corrupt_image")):
    assert cli.main(["index", "--export", export, "--data", data, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and (f"data source {data!r}" in err or "corrupt" in message), err
    assert not (tmp_path / "o").exists()  # a failed build leaves no half-made index
