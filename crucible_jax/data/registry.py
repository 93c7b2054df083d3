"""One table from `data.name` to its source: the module that reads it, the check a config load runs on its data
config and the module registering the source's own tasks (`crucible_jax.tasks`). The trainer, evaluation and the
benchmarks get their batches through `make_train_iterator` / `make_eval_batches` here.

Sources are named by module, imported on first use: loading a config imports only the validation of its own source,
and nothing imports DigitWorld (or grain, tfds) until a config of that source is validated or read.
Each pipeline module has `make_train_iterator`, `make_eval_batches` and `num_examples` with the signatures below,
and may have `record_stats(data_cfg) -> {key: count}` for results.json and `check_split(data_cfg, split)` to verify
a split's files before training (`data/verify.py`).
"""

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from crucible_jax.data import benchmarks


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a dataset's batches come from and how its data config is checked (modules named, imported on use)."""

  pipeline: str  # module with make_train_iterator / make_eval_batches / num_examples
  validate: str  # "module:function" raising ValueError naming the field; reads no records
  tasks: str | None = None  # module that registers the source's own tasks on import (None: generic tasks only)


_BENCHMARK = DataSource("crucible_jax.data.benchmarks", "crucible_jax.data.benchmarks:validate_benchmark_config")
SOURCES: dict[str, DataSource] = {
    "digit_world": DataSource("crucible_jax.data.digit_world.pipeline",
                              "crucible_jax.data.digit_world.validation:validate_data_config",
                              tasks="crucible_jax.data.digit_world.tasks"),
    **{name: _BENCHMARK for name in benchmarks.BENCHMARKS},
    "own": DataSource("crucible_jax.data.own.source", "crucible_jax.data.own.config:validate_own_data"),
    # a converted checkpoint: no dataset
    "pretrained": DataSource("crucible_jax.data.no_data", "crucible_jax.data.no_data:validate"),
}


def source_of(name: str) -> DataSource:
  """The registered source of `data.name`; ValueError listing the known names."""
  if name not in SOURCES:
    raise ValueError(f"unknown data.name={name!r}; known: {sorted(SOURCES)}")
  return SOURCES[name]


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """The config-load check of `data_cfg`'s source; registers the source's own tasks."""
  register_tasks(data_cfg.name)
  module, _, function = source_of(data_cfg.name).validate.partition(":")
  check: Callable[[ml_collections.ConfigDict], None] = getattr(importlib.import_module(module), function)
  check(data_cfg)


def register_tasks(name: str) -> None:
  """Register the own tasks of source `name` (importing its tasks module; once per process)."""
  module = source_of(name).tasks
  if module is not None:
    importlib.import_module(module)


def pipeline_of(name: str) -> ModuleType:
  """The module reading dataset `name`."""
  return importlib.import_module(source_of(name).pipeline)


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict, *, global_batch: int, seed: int, process_index: int | None = None,
    process_count: int | None = None, sample_hook: Callable[[int, dict], dict] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's numpy batches (global_batch / process_count samples each), checkpointable
  (`get_state`/`set_state`).

  `sample_hook(step, sample) -> sample` (e.g. a curriculum's weights) must be a pure, picklable function of its
  arguments: then the iterator state alone resumes it exactly.
  """
  return pipeline_of(data_cfg.name).make_train_iterator(
      data_cfg, global_batch=global_batch, seed=seed, process_index=process_index, process_count=process_count,
      sample_hook=sample_hook)


def make_eval_batches(
    data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int, process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every sample of `split` once, in order, in global batches of `batch_size` (this process gets its slice); the
  last batch is filled with weight-0 padding. `num_examples(data_cfg, split)` counts the real samples."""
  return pipeline_of(data_cfg.name).make_eval_batches(
      data_cfg, split, batch_size=batch_size, process_index=process_index, process_count=process_count)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Real samples in `split`: what eval metrics divide by (padding has weight 0)."""
  return pipeline_of(data_cfg.name).num_examples(data_cfg, split)


def record_stats(data_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """Bad-record and truncation counts of the data read so far, for results.json (empty where a source keeps none)."""
  stats: Any = getattr(pipeline_of(data_cfg.name), "record_stats", None)
  return {} if stats is None else stats(data_cfg)
