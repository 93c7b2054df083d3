"""`crucible bench step` on a tiny CLIP: the JSON contract, FLOP counts that agree, and the optional trace."""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from crucible_jax.bench import gemm, step
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
  ceiling = result["gemm_ceiling"]
  # the step's matmuls are part of what XLA counts, and include at least the analytic towers and logits
  assert 0.9 * result["analytic_flops_per_step"] <= ceiling["dot_flops_per_step"] < result["xla_flops_per_step"]
  assert ceiling["dot_flops_per_step"] == sum(row["flops"] * row["count"] for row in ceiling["dots"])
  assert result["gemm_ceiling_fraction_of_peak"] == pytest.approx(ceiling["flops_per_s"] / result["peak_flops_per_s"])
  assert result["step_fraction_of_gemm_ceiling"] == pytest.approx(ceiling["dot_seconds_per_step"] / result["step_s"])


def test_program_dots_counts_every_product_of_forward_backward_scan_and_the_costliest_branch():
  m, k, n = 4, 8, 16

  def loss(x, w, v):
    def body(carry, _):
      return jnp.tanh(carry @ w), None
    y, _ = jax.lax.scan(body, x, length=3)  # [m, k] @ [k, k], three times
    z = jax.lax.cond(y.sum() > 0, lambda: y @ v, lambda: jnp.zeros((m, n)))  # one [m, k] @ [k, n] at most
    return z.sum()

  x, w, v = jnp.ones((m, k)), jnp.ones((k, k)), jnp.ones((k, n))
  forward = gemm.program_dots(loss, x, w, v)
  assert sum(forward.values()) == 4
  assert sum(d.flops * c for d, c in forward.items()) == 3 * 2 * m * k * k + 2 * m * k * n
  # reverse mode adds, per product, one for each differentiated operand: dx and dw in the scan, dy and dv after it
  both = gemm.program_dots(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, w, v)
  assert sum(both.values()) == 12
  assert sum(d.flops * c for d, c in both.items()) == 3 * (3 * 2 * m * k * k + 2 * m * k * n)


def test_a_batched_dot_counts_its_batch_and_the_ceiling_sums_what_it_timed():
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))
  dots = gemm.program_dots(lambda p, q: jnp.einsum("bij,bjk->bik", p, q), a, b)
  (dot, count), = dots.items()
  assert (dot.flops, count) == (2 * 3 * 5 * 7 * 2, 1)
  ceiling = gemm.gemm_ceiling(dots + dots, iters=1)  # the same product twice per "step"
  (row,) = ceiling["dots"]
  assert row["count"] == 2 and ceiling["dot_flops_per_step"] == 2 * dot.flops
  assert ceiling["dot_seconds_per_step"] == pytest.approx(2 * row["seconds"])
  assert ceiling["flops_per_s"] == pytest.approx(dot.flops / row["seconds"])


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
