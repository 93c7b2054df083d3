"""Run the configured evaluators over data splits with a compiled eval step: the trainer's final evaluation and
`crucible eval` (params from `inference.load`, no Trainer)."""

import pathlib
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from crucible_jax import tasks
from crucible_jax.common_types import MODALITIES
from crucible_jax.data import loader, registry
from crucible_jax.parallel.distributed import fault_point
from crucible_jax.train.setup import Experiment


def global_host_view(outputs: Any, device_batch: Mapping[str, jax.Array],
                     inputs: Iterable[str] = ()) -> tuple[Any, dict[str, np.ndarray]]:
  """The step's outputs and its global batch as numpy on every process, row-aligned with each other.

  Each process holds only its slice of the batch on the host; the model's outputs are global. Gathering both from
  the same global arrays keeps their rows in one order on any number of processes. The raw modality inputs
  (pixels, waveforms, tokens) stay on device unless named in `inputs`: most evaluators read only labels and flags.
  """
  kept = {k: v for k, v in device_batch.items() if k not in MODALITIES or k in inputs}
  outputs, batch = multihost_utils.process_allgather((outputs, kept), tiled=True)
  return jax.tree.map(np.asarray, outputs), {k: np.asarray(v) for k, v in batch.items()}


def evaluate_split(eval_step: Callable, params: Any, batches: Iterable[dict], evaluators: Mapping[str, Any],
                   to_device: Callable[[dict], dict]) -> dict[str, float]:
  """Feed every batch of a split through `eval_step` and every evaluator; return `task/metric` scores.

  Evaluators see the whole global batch on every process (`global_host_view`), so each scores the whole split.
  An evaluator that reads raw modality inputs names them in an `inputs` attribute.
  """
  inputs = {m for e in evaluators.values() for m in getattr(e, "inputs", ())}
  for host_batch in batches:
    device_batch = to_device(host_batch)
    outputs, batch = global_host_view(eval_step(params, device_batch), device_batch, inputs)
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(outputs)[0]
           if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x))]
    if bad:
      raise FloatingPointError(f"evaluation outputs are not finite ({', '.join(bad[:4])}): the params have diverged")
    for evaluator in evaluators.values():
      evaluator.update(outputs, batch)
  results = {}
  for evaluator in evaluators.values():
    results.update(evaluator.result())
  return results


def evaluate_splits(experiment: Experiment, params: Any, splits: tuple[str, ...],
                    workdir: str | pathlib.Path) -> dict[str, float]:
  """Every evaluator of `experiment.config.evals` on each split; keys `split/task/metric`. Evaluators that need
  files (image_generation's recogniser) keep them under `workdir`."""
  config = experiment.config
  heads = tuple(sorted({h for e in tasks.build_evaluators(config.evals).values() for h in e.heads}))
  eval_step = experiment.eval_step(heads)
  eval_batch = config.get("eval_batch_size", config.batch_size)
  to_device = lambda b: loader.to_global_batch(b, experiment.batch_sharding)
  results = {}
  with jax.set_mesh(experiment.mesh):
    for split in splits:
      fault_point("eval")
      evaluators = tasks.build_evaluators(config.evals)
      for evaluator in evaluators.values():
        if hasattr(evaluator, "attach"):
          evaluator.attach(workdir=pathlib.Path(workdir), data=config.data, split=split)
      batches = registry.make_eval_batches(config.data, split, batch_size=eval_batch)
      scores = evaluate_split(eval_step, params, batches, evaluators, to_device)
      results.update({f"{split}/{k}": v for k, v in scores.items()})
  return results
