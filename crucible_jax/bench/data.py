"""`crucible bench data`: input-pipeline samples/s (0 and 2 workers) beside the train step's consumption rate.

Both rates are measured in the same process: the pipeline renders the experiment's train stream for real; the
step is the experiment's joint (last) stage compiled on its mesh and fed random batches. `ratio` is how many
times faster the pipeline produces samples than the step consumes them (≥1 means the input never starves the step).
"""

import os
import time
from typing import Any

import jax
import ml_collections

from crucible_jax.bench.common import device_info, time_call
from crucible_jax.bench.step import stage_step_inputs
from crucible_jax.train.setup import Experiment

WORKER_SETTINGS = (0, 2)  # config.data.num_workers values measured (0 = render in the main process)


def pipeline_rate(config: ml_collections.ConfigDict, num_workers: int, *, batches: int) -> dict[str, Any]:
  """Samples/s of the train iterator with `num_workers` processes, timed over `batches` after a warm-up.

  The warm-up drains the start-up (worker spawn, first renders) and the prefetch buffers' first fill, so the
  timed window sees the steady state; buffers refilled during it can inflate the rate by at most
  (workers × prefetch_buffer) / batches.
  """
  from crucible_jax.data import registry  # deferred: grain/tfds only when the data is benchmarked

  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.num_workers = num_workers
  start = time.perf_counter()
  iterator = registry.make_train_iterator(data_cfg, global_batch=config.batch_size, seed=config.seed)
  try:
    warmup = max(1, num_workers) * int(data_cfg.prefetch_buffer) + 1
    for _ in range(warmup):
      next(iterator)
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
      batch = next(iterator)
      samples += len(batch["weight"])
    seconds = time.perf_counter() - start
  finally:
    iterator.close()
  return {"num_workers": num_workers, "samples_per_s": samples / seconds, "timed_batches": batches,
          "timed_samples": samples, "timed_s": seconds, "startup_s": startup_s, "warmup_batches": warmup}


def step_rate(config: ml_collections.ConfigDict, *, steps: int) -> dict[str, Any]:
  """Samples/s of the last stage's compiled train step on random data (best of `steps` timed steps)."""
  experiment = Experiment(config)
  plan = experiment.plans[-1]
  step, state, batch, rng = stage_step_inputs(experiment, plan, config.seed)
  with jax.set_mesh(experiment.mesh):
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      return metrics["loss"]

    seconds = time_call(one_step, iters=steps, warmup=2)
  return {"stage": plan.name, "step_s": seconds, "samples_per_s": config.batch_size / seconds,
          "compile_s": compile_s, "timed_steps": steps, "mesh": dict(experiment.mesh.shape)}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Pipeline rate per worker setting, the step's consumption rate, and their ratio (target ≥5×)."""
  batches = int(config.get("bench_data_batches", 40))
  pipeline = {str(w): pipeline_rate(config, w, batches=batches) for w in WORKER_SETTINGS}
  best = max(pipeline.values(), key=lambda r: r["samples_per_s"])
  step = step_rate(config, steps=int(config.get("bench_steps", 10)))
  return {
      **device_info(),
      "mesh": step["mesh"],
      "host_cpus": os.cpu_count(),
      "workload": {"batch_size": config.batch_size, "modalities": list(config.model.modalities),
                   "data_variant": config.data.variant, "train_size": config.data.train_size},
      "pipeline_samples_per_s": best["samples_per_s"],
      "pipeline_best_num_workers": best["num_workers"],
      "pipeline": pipeline,
      "step_samples_per_s": step["samples_per_s"],
      "step": step,
      "ratio": best["samples_per_s"] / step["samples_per_s"],
      "target_ratio": 5.0,
      "note": ("pipeline and step are measured one after the other in this process; on a CPU-only machine they "
               "share the same cores in training, so the ratio is an upper bound there"),
  }
