"""Linear probes read a frozen encoder's pooled features and score them against the digits."""

import jax
import numpy as np

from crucible_jax.eval import probe
from crucible_jax.models import build_model, default_model_config, example_batch


def test_extract_features_pools_each_real_sample_of_one_modality():
  cfg = default_model_config()
  cfg.modalities = ("image", "audio")
  for family in ("image", "audio"):
    cfg[family].update(width=16, depth=1, heads=2, mlp=32)
  cfg.joint_dim = 16
  cfg.routing.enabled = True  # the probe bypasses the router: every real sample gets features
  cfg.routing.budget.update(image=0.5, audio=0.5)
  model = build_model(cfg)
  batch = {k: np.asarray(v) for k, v in example_batch(cfg, 4).items()}
  batch["audio"] = np.random.default_rng(0).normal(size=batch["audio"].shape).astype(np.float32) * 0.1
  batch["audio_len"] = np.full((4,), batch["audio"].shape[1], np.int32)
  batch["digits"] = np.array([[1, 2, -1, -1], [3, -1, -1, -1], [4, 5, 6, -1], [7, -1, -1, -1]], np.int32)
  batch["num_digits"] = np.array([2, 1, 3, 1], np.int32)
  batch["weight"] = np.array([1, 1, 1, 0], np.float32)  # the last sample is padding
  params = jax.jit(lambda r: model.init({"params": r, "routing": r}, batch))(jax.random.key(0))["params"]
  features = probe.extract_features(model, params, [batch, batch], "audio")
  assert features.x.shape == (6, 16) and np.all(np.isfinite(features.x))
  np.testing.assert_array_equal(features.num_digits, [2, 1, 3, 2, 1, 3])
  assert len(np.unique(features.x[:3].round(5), axis=0)) == 3  # different audio, different features


def test_linear_probe_reads_separable_features_and_reports_chance():
  rng = np.random.default_rng(0)
  digits = np.stack([rng.integers(0, 10, 200), np.full(200, -1)], 1).astype(np.int32)
  x = np.eye(10, dtype=np.float32)[digits[:, 0]] * 5 + rng.normal(size=(200, 10)).astype(np.float32) * 0.1
  features = probe.Features(x, digits, np.ones(200, np.int32))
  scores = probe.linear_probe(features, features)
  assert scores["first_digit"] == 1.0 and scores["string"] == 1.0
  assert scores["first_digit_chance"] < 0.2
