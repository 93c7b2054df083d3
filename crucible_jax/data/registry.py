"""One table from `data.name` to the module that reads it, the check a config load runs on its data config and the
module registering the source's own tasks (`crucible_jax.tasks`), imported when a config of that source validates.

Each pipeline module has `make_train_iterator`, `make_eval_batches` and `num_examples` with
`pipeline.make_train_iterator`'s signatures, and may have `record_stats(data_cfg) -> {key: count}` for
results.json. Pipeline modules import where data is read, so a config loads without grain or tfds.
"""

import dataclasses
import importlib
from types import ModuleType
from typing import Callable

import ml_collections

from crucible_jax.data import benchmarks, no_data
from crucible_jax.data.digit_world.validation import validate_data_config
from crucible_jax.data.own.config import validate_own_data


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a dataset's batches come from and how its data config is checked."""

  pipeline: str  # module with make_train_iterator / make_eval_batches / num_examples
  validate: Callable[[ml_collections.ConfigDict], None]  # ValueError naming the field; reads no records
  tasks: str | None = None  # module that registers the source's own tasks on import (None: generic tasks only)


def _benchmark(data_cfg: ml_collections.ConfigDict) -> None:
  if "root" not in data_cfg or "splits" not in data_cfg:
    raise ValueError(f"data.name={data_cfg.name!r} is a benchmark: build the data config with "
                     "benchmarks.benchmark_data_config (it needs data.root and data.splits)")


SOURCES: dict[str, DataSource] = {
    "digit_world": DataSource("crucible_jax.data.pipeline", validate_data_config,
                              tasks="crucible_jax.data.digit_world.tasks"),
    **{name: DataSource("crucible_jax.data.benchmarks", _benchmark) for name in benchmarks.BENCHMARKS},
    "own": DataSource("crucible_jax.data.own.source", validate_own_data),
    "pretrained": DataSource("crucible_jax.data.no_data", no_data.validate),  # a converted checkpoint: no dataset
}


def source_of(name: str) -> DataSource:
  """The registered source of `data.name`; ValueError listing the known names."""
  if name not in SOURCES:
    raise ValueError(f"unknown data.name={name!r}; known: {sorted(SOURCES)}")
  return SOURCES[name]


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """The config-load check of `data_cfg`'s source; registers the source's own tasks."""
  register_tasks(data_cfg.name)
  source_of(data_cfg.name).validate(data_cfg)


def register_tasks(name: str) -> None:
  """Register the own tasks of source `name` (importing its tasks module; once per process)."""
  module = source_of(name).tasks
  if module is not None:
    importlib.import_module(module)


def pipeline_of(name: str) -> ModuleType:
  """The module reading dataset `name`."""
  return importlib.import_module(source_of(name).pipeline)
