"""`crucible bench step`: samples/s and achieved FLOP/s of the train step against the matmul peak measured here."""

from typing import Any

import jax
import ml_collections
import numpy as np

from crucible_jax.bench.common import compiled_flops, device_info, matmul_peak, time_call
from crucible_jax.bench.flops import contrastive_train_flops
from crucible_jax.bench.gemm import gemm_ceiling, program_dots
from crucible_jax.train.setup import Experiment


def random_batch(experiment: Experiment, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch in the schema with random pixels/waveforms/tokens (the step's cost does not depend on content)."""
  rng = np.random.default_rng(seed)
  batch = experiment.example_batch()
  out = {}
  for key, value in batch.items():
    if value.dtype == np.float32:
      out[key] = rng.random(value.shape, np.float32)
    elif value.dtype == np.bool_:
      out[key] = np.ones(value.shape, bool)
    else:
      out[key] = rng.integers(1, 10, value.shape).astype(value.dtype)
  out["audio_len"] = np.full(batch["audio_len"].shape, batch["audio"].shape[1], np.int32)
  out["num_digits"] = np.full(batch["num_digits"].shape, batch["digits"].shape[1], np.int32)
  out["weight"] = np.ones(batch["weight"].shape, np.float32)
  return out


def stage_step_inputs(experiment: Experiment, plan, seed: int) -> tuple[Any, Any, Any, jax.Array]:
  """A stage's jitted train step with a fresh sharded state, a random batch on the mesh and an rng: what a timer needs."""
  program = experiment.stage_program(plan)
  state = experiment.new_state(program.make, program.shardings, experiment.init_params(jax.random.key(seed)))
  batch = jax.device_put(random_batch(experiment), experiment.batch_sharding)
  return program.train_step, state, batch, jax.random.key(1)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compile the first stage's train step, time it, and measure the machine's f32/bf16 matmul peak beside it."""
  experiment = Experiment(config)
  plan = experiment.plans[0]
  step, state, batch, rng = stage_step_inputs(experiment, plan, config.seed)
  with jax.set_mesh(experiment.mesh):
    compiled = step.lower(state, batch, rng).compile()
    xla_flops = compiled_flops(compiled) * experiment.mesh.size
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      return metrics["loss"]

    seconds = time_call(one_step, iters=int(config.get("bench_steps", 10)), warmup=2)
    dots = program_dots(step, holder["state"], batch, rng)
    if config.get("bench_profile_dir", ""):
      with jax.profiler.trace(config.bench_profile_dir):
        jax.block_until_ready([one_step() for _ in range(3)])
  compute = str(config.precision.compute)
  # an accelerator's matmul units fill only at larger sizes than a CPU's: 8192^2 reaches an H200's bf16 plateau
  gpu = experiment.platform == "gpu"
  sizes = (1024, 2048, 3072, 4096) + ((8192,) if gpu else ())
  peak = matmul_peak("bfloat16" if compute == "bfloat16" else "float32", sizes=sizes, repeats=10 if gpu else 1)
  # simulated CPU devices share one host's cores; an accelerator brings its own matmul units
  chips = jax.process_count() if experiment.platform == "cpu" else experiment.mesh.size
  mesh_peak = peak["peak_flops_per_s"] * chips
  analytic = contrastive_train_flops(config.model, config.batch_size)
  # XLA's GPU cost analysis skips library calls (cuBLAS GEMMs, cuDNN attention): there the analytic count is the one
  model_flops = analytic if gpu else xla_flops
  flops_per_s = model_flops / seconds
  # Global shapes timed on one chip: a fair ceiling where the mesh is one chip or simulated devices share one host.
  ceiling = gemm_ceiling(dots) if experiment.platform == "cpu" or experiment.mesh.size == 1 else None
  return {
      **device_info(experiment.mesh),
      "workload": {"batch_size": config.batch_size, "modalities": list(config.model.modalities),
                   "compute_dtype": compute},
      "step_s": seconds,
      "samples_per_s": config.batch_size / seconds,
      "model_flops_per_step": model_flops,
      "model_flops_source": "analytic" if gpu else "xla_cost_analysis",
      "xla_flops_per_step": xla_flops,
      "analytic_flops_per_step": analytic,
      "flops_per_s": flops_per_s,
      "analytic_flops_per_s": analytic / seconds,
      "peak_flops_per_s": mesh_peak,
      "peak_detail": peak,
      "fraction_of_peak": flops_per_s / mesh_peak,
      "analytic_fraction_of_peak": analytic / seconds / mesh_peak,
      "gemm_ceiling": ceiling,
      "gemm_ceiling_fraction_of_peak": ceiling and ceiling["flops_per_s"] / peak["peak_flops_per_s"],
      "step_fraction_of_gemm_ceiling": ceiling and ceiling["dot_seconds_per_step"] / seconds,
      "note": "step_s is the best of bench_steps timed steps; FLOPs are the whole step's over the mesh; peak is the "
              "best square matmul measured on one device in this process, times the mesh's accelerators (CPU: "
              "times the processes, as simulated CPU devices share one host's cores); gemm_ceiling times each of "
              "the step's own dot_generals alone at its shape, so gemm_ceiling_fraction_of_peak is the most of the "
              "peak the step's matmuls reach on this backend (up to overlap between matmuls), and "
              "step_fraction_of_gemm_ceiling is the share of the step those matmuls alone would take",
  }
