"""`crucible bench step` on a tiny CLIP: the JSON contract, FLOP counts that agree, and the optional trace."""

import pathlib
import re

import jax
import pytest

from crucible_jax.bench import step
from crucible_jax.config import load_experiment
from crucible_jax.train.setup import Experiment


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
  # the 8 simulated CPU devices share this host's cores: the peak is one host's, not eight
  assert result["peak_flops_per_s"] == result["peak_detail"]["peak_flops_per_s"]
  assert result["samples_per_s"] == pytest.approx(8 / result["step_s"])
  assert list(pathlib.Path(tmp_path).rglob("*.xplane.pb"))


def test_cpu_train_step_does_not_copy_the_optimizer_moments():
  config = load_experiment("experiments/clip_bench.py", [
      "--config.batch_size=8", "--config.mesh.data=8", "--config.model.image.width=32", "--config.model.image.mlp=64",
      "--config.model.image.depth=1", "--config.model.text.width=32", "--config.model.text.mlp=64",
      "--config.model.text.depth=1", "--config.model.joint_dim=16",
  ])
  experiment = Experiment(config)
  train_step, state, batch, rng = step.stage_step_inputs(experiment, experiment.plans[0], seed=0)
  with jax.set_mesh(experiment.mesh):
    hlo = train_step.lower(state, batch, rng).compile().as_text()
  moments = re.findall(r"%(\S+) = \S+ parameter\(\d+\).*op_name=\"state\.opt_state\S*\.(?:mu|nu)\[", hlo)
  assert moments  # the donated Adam moments are entry parameters of the step
  copied = [name for name in moments if f" copy(%{name})" in hlo]
  assert not copied, f"{len(copied)} of {len(moments)} Adam moments are copied at entry, e.g. {copied[:2]}"
