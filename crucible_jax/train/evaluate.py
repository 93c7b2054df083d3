"""Run the configured evaluators over a data split with a compiled eval step."""

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def evaluate_split(eval_step: Callable, params: Any, batches: Iterable[dict], evaluators: Mapping[str, Any],
                   to_device: Callable[[dict], dict]) -> dict[str, float]:
  """Feed every batch of a split through `eval_step` and every evaluator; return `task/metric` scores.

  Outputs are gathered to every host (`process_allgather`) so each evaluator sees the whole split.
  """
  for host_batch in batches:
    outputs = eval_step(params, to_device(host_batch))
    outputs = jax.tree.map(np.asarray, multihost_utils.process_allgather(outputs, tiled=True))
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(outputs)[0]
           if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x))]
    if bad:
      raise FloatingPointError(f"evaluation outputs are not finite ({', '.join(bad[:4])}): the params have diverged")
    for evaluator in evaluators.values():
      evaluator.update(outputs, host_batch)
  results = {}
  for evaluator in evaluators.values():
    results.update(evaluator.result())
  return results
