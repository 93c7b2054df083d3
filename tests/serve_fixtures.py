"""Shared tiny-model fixtures of the export, index and serving tests: a params directory built from init."""

import pathlib

import jax

from crucible_jax import inference, load_experiment
from crucible_jax.train.setup import Experiment

TINY = "experiments/digit_world.py:tiny"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_params_dir(out: pathlib.Path, seed: int = 0, routed: bool = False) -> pathlib.Path:
  """A params directory of the tiny DigitWorld model (with the modality router if `routed`) at its (jitted) init:
  no training, one compile."""
  config = load_experiment(str(ROOT / TINY))
  config.model.routing.enabled = routed
  params = Experiment(config).init_params(jax.random.key(seed))
  return inference.save_params_dir(out, config, params)
