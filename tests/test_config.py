"""Every shipped experiment parses, validates and builds its model; bad configs name the culprit."""

import pathlib

import jax
import pytest

from crucible_jax.config import ConfigError, apply_override, load_experiment
from crucible_jax.models import build_model
from crucible_jax.parallel.mesh import build_mesh, check_batch_divisible
from crucible_jax.parallel.precision import Policy

EXPERIMENTS = sorted(pathlib.Path(__file__).parent.parent.glob("experiments/*.py"))
DIGIT_WORLD = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")


def _variants(path: pathlib.Path) -> list[str]:
  module_text = path.read_text()
  if path.stem == "digit_world":
    return ["", ":tiny", ":corrupted", ":imbalanced", ":single_stage", ":no_cross_attention", ":tiny,corrupted",
            ":routed", ":generate", ":tiny,generate", ":voices,augment"]
  if path.stem == "clip_bench":
    return ["", ":vit_b16"]
  if path.stem == "digit_world_speech":
    return ["", ":voices,augment"]
  if path.stem == "own_data":
    return ["", ":tiny"]
  return [""] if "VARIANTS" not in module_text else [""]


@pytest.mark.parametrize("spec", [f"{p}{v}" for p in EXPERIMENTS for v in _variants(p)])
def test_experiment_parses_validates_and_builds(spec, request):
  own = ["--config.data.manifest=" + request.getfixturevalue("own_collection")["manifest"]] if "own_data" in spec else []
  config = load_experiment(spec, own)
  build_model(Policy.from_config(config.get("precision", {})).apply_to_model_config(config.model))  # as Experiment
  assert config.is_locked
  assert all(config.stages[name].steps >= 0 for name in config.stage_order)


def test_override_parses_to_field_type():
  config = load_experiment(f"{DIGIT_WORLD}:tiny", ["--config.batch_size=16", "--config.stages.align.lr=0.5",
                                                    "--config.model.fusion.cross_attention=false",
                                                    "--config.data.image_size=(16, 64)"])
  assert config.batch_size == 16 and isinstance(config.batch_size, int)
  assert config.stages.align.lr == 0.5
  assert config.model.fusion.cross_attention is False
  assert tuple(config.data.image_size) == (16, 64)


@pytest.mark.parametrize("override, culprit", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.stages.align.nope=1", "stages.align.nope"),
    ("--config.batch_size=abc", "batch_size"),
    ("--config.batch_size=30", "batch_size"),  # not divisible by 8 devices
    ("--config.mesh.data=3", "mesh"),
    ("--config.nan_policy=explode", "nan_policy"),
    ("--config.data.text_len=40", "text_len"),
    ("--config.model.modalities=('image','text')", "objective"),
    ("--config.stages.joint.warmup=100000", "warmup"),
    ("--config.stage_order=('unimodal','nope')", "nope"),
])
def test_bad_config_names_the_key(override, culprit):
  with pytest.raises((ConfigError, ValueError)) as error:
    config = load_experiment(f"{DIGIT_WORLD}:tiny", [override])
    # sizes are checked against the real device count when the mesh is built, before anything compiles
    mesh = build_mesh(dict(config.mesh))
    check_batch_divisible(config.batch_size, mesh)
  assert culprit in str(error.value)


def test_unknown_variant_and_missing_file():
  with pytest.raises(ValueError, match="bogus"):
    load_experiment(f"{DIGIT_WORLD}:bogus")
  with pytest.raises(ConfigError, match="not found"):
    load_experiment("experiments/does_not_exist.py")


def test_override_without_value_is_rejected():
  config = load_experiment(f"{DIGIT_WORLD}:tiny")
  config.unlock()
  with pytest.raises(ConfigError, match="key=value"):
    apply_override(config, "--config.batch_size")
