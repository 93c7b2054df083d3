"""The suite compiles with fast-compile XLA:CPU flags (conftest.TEST_XLA_FLAGS); production runs compile optimised
code. The joint stage's loss and gradients must not depend on which: checked here against a subprocess that compiles
the same program with XLA's default flags. And flags set in XLA_FLAGS win over a program's own CPU options."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from crucible_jax.bench.step import random_batch
from crucible_jax.config import load_experiment
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.train import step as step_lib
from crucible_jax.train.setup import Experiment

TINY = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py") + ":tiny"


def joint_loss_and_grads() -> tuple[float, list[np.ndarray]]:
  """Loss and gradient leaves of the tiny DigitWorld joint stage on one device, fixed params and batch."""
  axes = {"data": 1, "fsdp": 1, "tensor": 1}
  config = load_experiment(TINY, [f"--config.mesh.{k}={v}" for k, v in axes.items()])
  experiment = Experiment(config, build_mesh(axes, devices=jax.devices()[:1]))
  _, frozen, heads, objective = experiment.stage_parts(experiment.plans[-1])
  loss_fn = step_lib.make_loss_fn(experiment.model, objective, heads, frozen, experiment.rules)
  params = experiment.init_params(jax.random.key(0))
  batch = jax.device_put(random_batch(experiment, seed=3), experiment.batch_sharding)
  with jax.set_mesh(experiment.mesh):
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.key(1))
  return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_fast_compile_flags_give_the_numbers_of_xlas_defaults(tmp_path):
  loss, grads = joint_loss_and_grads()
  assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]  # this process: the suite's flags
  out = tmp_path / "defaults.npz"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, timeout=900)
  reference = np.load(out)
  assert np.isfinite(loss) and loss > 0
  np.testing.assert_allclose(loss, reference["loss"], rtol=1e-5)
  assert len(grads) == len(reference.files) - 1
  for i, g in enumerate(grads):
    np.testing.assert_allclose(g, reference[f"grad_{i}"], rtol=1e-4, atol=1e-6, err_msg=f"gradient leaf {i}")


def test_xla_flags_in_the_environment_win_over_the_programs_cpu_compile_options(monkeypatch):
  options = {**step_lib.CPU_TRAIN_STEP_COMPILER_OPTIONS, "xla_cpu_use_fusion_emitters": False}
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2")
  chosen = step_lib.compiler_options(options, "cpu")
  assert chosen == {"xla_cpu_copy_insertion_use_region_analysis": True, "xla_cpu_use_fusion_emitters": False}
  monkeypatch.setenv("XLA_FLAGS", "")
  assert step_lib.compiler_options(options, "cpu") == options
  assert step_lib.compiler_options(options, "gpu") is None


if __name__ == "__main__":  # the reference: run as a script with XLA's default flags
  ref_loss, ref_grads = joint_loss_and_grads()
  np.savez(sys.argv[1], loss=ref_loss, **{f"grad_{i}": g for i, g in enumerate(ref_grads)})
