"""The task registry: one table from task name to its head, modalities, objective terms and evaluators.

Importing this package registers the generic tasks (`tasks/generic.py`); a data source's own tasks register when
its config is validated (`data/registry.py`). Add a task with `register(Task(...))`.
"""

from typing import Any, Mapping

from crucible_jax.tasks import generic  # noqa: F401  (registers the generic tasks)
from crucible_jax.tasks.registry import (LOSS_KINDS, SourceExtras, Task, TermContext, evaluator_factory, evaluator_task,
                                         fixed, get, names, one_modality, register, register_source, source_extras,
                                         task_of_term)

__all__ = ["LOSS_KINDS", "SourceExtras", "Task", "TermContext", "build_evaluators", "evaluator_factory",
           "evaluator_task", "fixed", "get",
           "names", "one_modality", "register", "register_source", "source_extras", "task_of_term", "term_modalities"]


def term_modalities(key: str) -> frozenset[str]:
  """The modalities objective term `key` (`task[/arg]`) needs; ValueError for an unknown task or a bad arg."""
  task, arg = task_of_term(key)
  return task.modalities(arg)


def _plain(cfg: Any) -> dict[str, Any]:
  return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def build_evaluators(evals_cfg: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """One evaluator per config entry; the entry's name is its kind unless it sets `kind=...`."""
  built = {}
  for name, cfg in _plain(evals_cfg).items():
    kwargs = _plain(cfg or {})
    kind = kwargs.pop("kind", name)
    try:
      factory = evaluator_factory(kind)
    except ValueError as e:
      raise ValueError(f"config.evals.{name}: {e}") from None
    try:
      built[name] = factory(**kwargs)
    except TypeError as err:
      raise ValueError(f"config.evals.{name}: bad options {sorted(kwargs)} for {kind!r}: {err}") from None
  return built
