"""`crucible export`: artifacts run with jax+numpy alone and equal the in-process model (f32, 1e-5)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from crucible_jax import cli, inference
from crucible_jax.common_types import MODALITIES, present_key
from crucible_jax.serve.artifact import ExportDir
from serve_fixtures import ROOT, tiny_params_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  params = tiny_params_dir(root / "params", routed=True)  # a routed model: its router is exported too
  assert cli.main(["export", "--workdir", str(params), "--out", str(root / "export")]) == 0
  return inference.load(params), ExportDir(root / "export")


def _inputs(model: inference.InferenceModel, size: int) -> dict[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  batch = model.empty_batch(size)
  return {
      "image": {"image": rng.random(batch["image"].shape, np.float32)},
      "video": {"video": rng.random(batch["video"].shape, np.float32)},
      "text": {"text": rng.integers(1, 200, batch["text"].shape).astype(np.int32)},
      "audio": {"audio": 0.1 * rng.standard_normal(batch["audio"].shape).astype(np.float32),
                "audio_len": rng.integers(4000, batch["audio"].shape[1], size).astype(np.int32)},
  }


def test_encoders_equal_in_process_model(exported):
  model, export = exported
  for modality, inputs in _inputs(model, 3).items():  # 3: padded to the bucket of 4 and sliced back
    np.testing.assert_allclose(export.embed(modality, inputs), model.embed(modality, inputs), atol=1e-5,
                               err_msg=modality)


def test_fusion_and_heads_equal_in_process_model(exported):
  model, export = exported
  inputs = _inputs(model, 2)
  batch = model.empty_batch(2)
  for modality, values in inputs.items():
    batch.update(values)
    batch[present_key(modality)][:] = True
  batch[present_key("video")][1] = False  # the fusion must honour presence
  with jax.set_mesh(model.experiment.mesh):
    want = model.experiment.model.apply({"params": model.params}, batch, heads=("fused", "tagging"), route=False)
  fusion_in = {f"pooled_{m}": export.artifact(f"encoder_{m}")(inputs[m])["pooled"] for m in MODALITIES}
  fusion_in.update({present_key(m): batch[present_key(m)] for m in MODALITIES})
  fused = export.artifact("fusion")(fusion_in)
  np.testing.assert_allclose(fused["fusion_weights"], want["fusion_weights"], atol=1e-5)
  logits = export.artifact("head_fused")({"fused": fused["fused"]})["logits"]
  np.testing.assert_allclose(logits.reshape(want["fused_logits"].shape), want["fused_logits"], atol=1e-5)
  tags = export.artifact("head_tagging")({"pooled_audio": fusion_in["pooled_audio"]})["logits"]
  np.testing.assert_allclose(tags, want["tag_logits"], atol=1e-5)


def test_asr_vqa_and_router_equal_in_process_model(exported):
  model, export = exported
  inputs = _inputs(model, 3)
  batch = model.empty_batch(3)
  for modality, values in inputs.items():
    batch.update(values)
    batch[present_key(modality)][:] = True
  batch[present_key("image")][2] = False  # the router must honour presence
  batch["question"] = np.random.default_rng(1).integers(1, 200, batch["question"].shape).astype(np.int32)
  with jax.set_mesh(model.experiment.mesh):
    want = model.experiment.model.apply({"params": model.params}, batch, heads=("vqa", "asr"), route=False)
  audio, image = export.artifact("encoder_audio")(inputs["audio"]), export.artifact("encoder_image")(inputs["image"])
  np.testing.assert_array_equal(audio["token_mask"], want["ctc_mask"])
  asr = export.artifact("head_asr")({"tokens_audio": audio["tokens"], "token_mask_audio": audio["token_mask"]})
  np.testing.assert_allclose(asr["logits"], want["ctc_logits"], atol=1e-5)
  vqa = export.artifact("head_vqa")({"question": batch["question"], "tokens_image": image["tokens"],
                                     "token_mask_image": image["token_mask"] & batch["image_present"][:, None]})
  np.testing.assert_allclose(vqa["logits"], want["vqa_logits"], atol=1e-5)
  scored = export.manifest["router_modalities"]
  scores = export.artifact("router")({k: batch[k] for k in export.artifact("router").inputs})["scores"]
  assert scored == list(MODALITIES) and scores.shape == (3, len(scored))
  np.testing.assert_allclose(scores, np.stack([want["routing_aux"]["scores"][m] for m in scored], 1), atol=1e-5)


def test_manifest_describes_inputs_and_preprocessing(exported):
  model, export = exported
  manifest = export.manifest
  assert manifest["artifacts"]["encoder_image"]["inputs"]["image"] == {"shape": [None, 16, 64, 1], "dtype": "float32"}
  assert manifest["artifacts"]["encoder_audio"]["inputs"]["audio_len"] == {"shape": [None], "dtype": "int32"}
  assert manifest["preprocessing"]["text"]["max_len"] == model.config.data.text_len
  assert manifest["preprocessing"]["audio"]["sample_rate"] == model.config.data.sample_rate
  assert {k: manifest["preprocessing"]["image"][k] for k in ("crop", "mean", "std")} == {
      "crop": "centre", "mean": [0.0], "std": [1.0]}  # DigitWorld pixels are not normalised
  with pytest.raises(ValueError, match="'image' of 'encoder_image' has shape"):
    export.embed("image", {"image": np.zeros((1, 8, 8, 1), np.float32)})


def test_loader_needs_only_jax_and_numpy(exported, tmp_path):
  """The artifact loader, loaded by file path, runs an encoder without importing crucible's model code."""
  model, export = exported
  tokens = _inputs(model, 2)["text"]["text"]
  np.save(tmp_path / "tokens.npy", tokens)
  np.save(tmp_path / "want.npy", model.embed("text", {"text": tokens}))
  script = f"""
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("artifact", {str(ROOT / 'crucible_jax/serve/artifact.py')!r})
artifact = importlib.util.module_from_spec(spec); spec.loader.exec_module(artifact)
got = artifact.ExportDir({str(export.directory)!r}).embed("text", {{"text": np.load({str(tmp_path / 'tokens.npy')!r})}})
np.testing.assert_allclose(got, np.load({str(tmp_path / 'want.npy')!r}), atol=1e-5)
leaked = sorted(m for m in sys.modules if m.startswith(("crucible_jax", "flax")))
assert not leaked, leaked
print("ok")
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_export_cli_errors_name_the_culprit(exported, tmp_path, capsys):
  assert cli.main(["export", "--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
  assert "nowhere" in capsys.readouterr().err
  _, export = exported
  assert cli.main(["export", "--workdir", str(export.directory.parent / "params"), "--out", str(export.directory)]) == 1
  assert "not empty" in capsys.readouterr().err
