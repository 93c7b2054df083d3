"""`crucible bench step` on a tiny CLIP: the JSON contract, FLOP counts that agree, and the optional trace."""

import pathlib

import pytest

from crucible_jax.bench import step
from crucible_jax.config import load_experiment


def test_step_bench_reports_the_contract_keys_with_consistent_flops_and_writes_a_trace(tmp_path):
  config = load_experiment("experiments/clip_bench.py", [
      "--config.batch_size=8", "--config.mesh.data=8", "--config.bench_steps=1", f"--config.bench_profile_dir={tmp_path}",
      "--config.model.image.width=32", "--config.model.image.mlp=64", "--config.model.image.depth=1",
      "--config.model.text.width=32", "--config.model.text.mlp=64", "--config.model.text.depth=1",
      "--config.model.joint_dim=16",
  ])
  result = step.run(config)
  for key in ("samples_per_s", "model_flops_per_step", "flops_per_s", "peak_flops_per_s", "fraction_of_peak",
              "device", "mesh"):
    assert key in result
  assert result["model_flops_source"] == "xla_cost_analysis"  # on CPU XLA counts every dot
  # XLA also counts elementwise work and the optimizer; the analytic count is matmuls only
  assert result["analytic_flops_per_step"] <= result["model_flops_per_step"] < 3 * result["analytic_flops_per_step"]
  assert result["fraction_of_peak"] == pytest.approx(result["flops_per_s"] / result["peak_flops_per_s"])
  assert result["samples_per_s"] == pytest.approx(8 / result["step_s"])
  assert list(pathlib.Path(tmp_path).rglob("*.xplane.pb"))
