"""`init_from`: strict by default (a report of missing, unexpected and shape-mismatched keys), partial on request."""

import json

import flax.traverse_util
import jax
import ml_collections
import numpy as np
import pytest

from crucible_jax.inference import save_params_dir
from crucible_jax.interop.archs import Arch, Tower
from crucible_jax.interop.config import CLIP_TOWERS, converted_config
from crucible_jax.parallel import mesh as mesh_lib
from crucible_jax.train import init_from
from crucible_jax.train.setup import Experiment


def _config(text_width: int) -> ml_collections.ConfigDict:
  arch = Arch(Tower(64, 1, 1, 128), Tower(text_width, 1, 1, 128), 16, 8, 8, 50, 32)
  config = converted_config(arch, CLIP_TOWERS, {}, {}, "test", None)
  config.batch_size = 1
  return config


def _experiment(config: ml_collections.ConfigDict) -> Experiment:
  return Experiment(config, mesh_lib.build_mesh({"data": -1}, jax.local_devices()[:1]))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A params directory of a tiny CLIP (text width 64) and its params."""
  experiment = _experiment(_config(64))
  params = jax.device_get(experiment.init_params(jax.random.key(7)))
  return save_params_dir(tmp_path_factory.mktemp("src") / "params_dir", experiment.config, params), params


def _apply(source_dir, experiment, workdir, **keys):
  config = experiment.config.copy_and_resolve_references()
  config.init_from = str(source_dir)
  config.update(keys)
  fresh = experiment.init_params(jax.random.key(0))
  return fresh, init_from.apply(config, fresh, experiment.param_shardings, workdir)


def test_strict_stops_with_report_and_partial_loads_what_fits(source, tmp_path):
  source_dir, source_params = source
  target = _experiment(_config(128))  # the text tower is wider: its params no longer fit
  with pytest.raises(init_from.InitFromError, match=r"mismatched \(\d+\): encoders_text/") as error:
    _apply(source_dir, target, tmp_path)
  assert "encoders_image/" not in str(error.value) and not (tmp_path / init_from.REPORT_FILE).exists()
  fresh, loaded = _apply(source_dir, target, tmp_path, init_from_partial=True)
  report = json.loads((tmp_path / init_from.REPORT_FILE).read_text())
  assert report["mismatched"] and all(k.startswith(("encoders_text/", "projections_text/"))
                                      for k in report["mismatched"])
  src = flax.traverse_util.flatten_dict(source_params, sep="/")
  new, init = (flax.traverse_util.flatten_dict(t, sep="/") for t in (loaded, fresh))
  kernel = "encoders_image/encoder/transformer/block_0/mlp/fc1/kernel"
  np.testing.assert_array_equal(np.asarray(new[kernel]), src[kernel])
  text = "encoders_text/token_embed/embedding"
  np.testing.assert_array_equal(np.asarray(new[text]), np.asarray(init[text]))


def test_take_selects_towers(source, tmp_path):
  source_dir, source_params = source
  target = _experiment(_config(128))
  _, loaded = _apply(source_dir, target, tmp_path, init_from_take=("^encoders_image/", "^projections_image/"))
  report = json.loads((tmp_path / init_from.REPORT_FILE).read_text())
  assert not (report["missing"] or report["unexpected"] or report["mismatched"])
  assert all(k.startswith(("encoders_image/", "projections_image/")) for k in report["loaded"])
  np.testing.assert_array_equal(np.asarray(loaded["projections_image"]["proj"]["kernel"]),
                                source_params["projections_image"]["proj"]["kernel"])
  with pytest.raises(init_from.InitFromError, match="selects no param"):
    _apply(source_dir, target, tmp_path, init_from_take=("^no_such_tower/",))
  with pytest.raises(init_from.InitFromError, match="neither a params directory"):
    _apply(tmp_path, target, tmp_path)


def test_a_run_starts_from_init_from_and_embeds_from_its_workdir(tmp_path):
  """The user's path: `init_from` in a tiny DigitWorld run (lr 0 keeps what was loaded), then `crucible embed
  --workdir` on a PNG, a string and a WAV with the run's own preprocessing."""
  from PIL import Image
  import soundfile
  from crucible_jax.cli import main
  from crucible_jax.config import load_experiment
  from crucible_jax.train.loop import Trainer
  from test_train import DIGIT_WORLD, SHORT
  overrides = [*SHORT, "--config.stage_order=('unimodal',)", "--config.stages.unimodal.lr=0.0",
               "--config.stages.unimodal.steps=2", "--config.stages.unimodal.warmup=0", "--config.eval_splits=()"]
  take = "--config.init_from_take=('^encoders_image/',)"
  run_config = load_experiment(f"{DIGIT_WORLD}:tiny", [*overrides, f"--config.init_from={tmp_path / 'src'}", take])
  with run_config.unlocked():
    run_config.plots = False
  trainer = Trainer(run_config, tmp_path / "run")
  try:  # the source: the same model from another seed, written before the run starts
    source = jax.device_get(trainer.experiment.init_params(jax.random.key(11)))
    save_params_dir(tmp_path / "src", run_config, source)
    trainer.run()
    final = trainer.restore_final_params()
  finally:
    trainer.close()
  report = json.loads((tmp_path / "run" / init_from.REPORT_FILE).read_text())
  assert report["loaded"] and all(k.startswith("encoders_image/") for k in report["loaded"])
  np.testing.assert_array_equal(np.asarray(final["encoders_image"]["patch_embed"]["kernel"]),
                                source["encoders_image"]["patch_embed"]["kernel"])
  assert not np.array_equal(np.asarray(final["encoders_text"]["token_embed"]["embedding"]),
                            source["encoders_text"]["token_embed"]["embedding"])
  Image.fromarray(np.zeros((20, 50), np.uint8)).save(tmp_path / "digits.png")
  soundfile.write(tmp_path / "digits.wav", np.zeros(4000, np.float32), 8000)
  assert main(["embed", "--workdir", str(tmp_path / "run"), "--images", str(tmp_path / "digits.png"),
               "--texts", "37", "--audio", str(tmp_path / "digits.wav"), "--json", str(tmp_path / "e.json")]) == 0
  got = json.loads((tmp_path / "e.json").read_text())
  assert sorted(got) == ["audio", "image", "text"]
  for vectors in got.values():
    np.testing.assert_allclose(np.linalg.norm(np.asarray(vectors), axis=-1), 1.0, rtol=1e-5)
