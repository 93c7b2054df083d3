"""The dynamic curriculum: pacing, weights in the grain pipeline, reproducibility and exact resume."""

import pathlib

import ml_collections
import numpy as np
import pytest

from crucible_jax.config import load_experiment
from crucible_jax.data import registry
from crucible_jax.train import curriculum

IMBALANCE = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world_imbalance.py")
BATCH = 16
LENGTH = dict(kind="length", start=0.0, ramp_steps=6, pacing="linear", min_weight=0.25)


def test_competence_and_weights_follow_digit_count():
  spec = curriculum.curriculum_spec(LENGTH, max_digits=4)
  assert curriculum.competence(0, spec) == 0.0 and curriculum.competence(6, spec) == 1.0
  assert [curriculum.sample_weight(n, 0, spec) for n in (1, 2, 3, 4)] == [1.0, 0.25, 0.25, 0.25]
  assert [curriculum.sample_weight(n, 3, spec) for n in (1, 2, 3, 4)] == [1.0, 1.0, 0.25, 0.25]
  assert [curriculum.sample_weight(n, 100, spec) for n in (1, 2, 3, 4)] == [1.0] * 4
  sqrt = curriculum.curriculum_spec(dict(LENGTH, pacing="sqrt", start=0.1), max_digits=4)
  values = [curriculum.competence(t, sqrt) for t in range(8)]
  assert values[0] == pytest.approx(0.1) and values == sorted(values) and values[-1] == 1.0
  off = curriculum.curriculum_spec({"kind": "none"}, max_digits=4)
  assert curriculum.sample_weight(4, 0, off) == 1.0


def test_curriculum_config_is_validated():
  with pytest.raises(ValueError, match="curriculum.kind"):
    curriculum.curriculum_spec(dict(LENGTH, kind="loss"), 4)
  with pytest.raises(ValueError, match="curriculum.min_weight"):
    curriculum.curriculum_spec(dict(LENGTH, min_weight=2.0), 4)
  with pytest.raises(ValueError, match="unknown fields"):
    curriculum.curriculum_spec(dict(LENGTH, rate=1.0), 4)


@pytest.fixture(scope="module")
def config():
  return load_experiment(f"{IMBALANCE}:tiny", [f"--config.curriculum.{k}={v}" for k, v in LENGTH.items()])


def _iterator(config):
  return registry.make_train_iterator(config.data, global_batch=BATCH, seed=config.seed,
                                      sample_hook=curriculum.sample_hook(config))


def _weights(iterator, n):
  return [(np.asarray(b["num_digits"]), np.asarray(b["weight"]), np.asarray(b["string_id"]))
          for b in (next(iterator) for _ in range(n))]


def test_pipeline_weights_are_the_curriculum_and_reproducible(config):
  spec = curriculum.curriculum_spec(config.curriculum, int(config.data.max_digits))
  first, second = _weights(_iterator(config), 8), _weights(_iterator(config), 8)
  for step, ((digits, weight, ids), (digits2, weight2, ids2)) in enumerate(zip(first, second)):
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(weight, weight2)
    np.testing.assert_array_equal(weight, [curriculum.sample_weight(int(n), step, spec) for n in digits])
  assert any(np.any(w < 1) for _, w, _ in first[:2]) and all(np.all(w == 1) for _, w, _ in first[6:])
  plain = registry.make_train_iterator(config.data, global_batch=BATCH, seed=config.seed)
  assert all(np.all(w == 1) for _, w, _ in _weights(plain, 2))


def test_resume_from_iterator_state_restores_the_curriculum(config):
  iterator = _iterator(config)
  _weights(iterator, 3)
  saved = iterator.get_state()
  expected = _weights(iterator, 4)
  resumed = _iterator(config)
  resumed.set_state(saved)
  for (d, w, i), (d2, w2, i2) in zip(expected, _weights(resumed, 4)):
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(w, w2)
  assert any(np.any(w < 1) for _, w, _ in expected)  # the resumed batches are mid-curriculum


def test_sample_hook_is_off_by_default(config):
  plain = ml_collections.ConfigDict(dict(data=dict(max_digits=4)))
  assert curriculum.sample_hook(plain) is None
  assert curriculum.sample_hook(load_experiment(IMBALANCE + ":tiny")) is None
  assert curriculum.sample_hook(config) is not None
