"""The task table: every task (head) registered once with its modalities, outputs, objective terms and evaluators.

A config names tasks in two places: objective terms `stages.<s>.objective.<task>[/<arg>]` and evaluators
`evals.<name>` (kind = an evaluator a task registered). Generic tasks register in `tasks/generic.py`; a data source
registers its own (DigitWorld: `data/digit_world/tasks.py`) when `data/registry.py` resolves it.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array

from crucible_jax.common_types import MODALITIES

LOSS_KINDS = ("clip", "siglip")  # contrastive loss of `contrastive/<a>-<b>` terms (config.loss_kind)

Outputs = Mapping[str, Any]
Batch = Mapping[str, Array]
TermFn = Callable[[Outputs, Batch], tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class TermContext:
  """What a term builder may read besides its key: the loss kind, the mesh layout and per-source targets."""

  loss_kind: str = "clip"
  mesh: Mesh | None = None
  batch_axes: Sequence[str] = ("data", "fsdp")
  gather_axes: Sequence[str] = ()
  reference_glyphs: np.ndarray | None = None  # a source's reference images per label (imagine/<m>)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: the model head it reads, what it needs and how it is trained and scored.

  `modalities(arg)` names the modalities the term `name/arg` needs (arg "" for a bare `name`), raising ValueError
  for a bad arg; `term(arg, key, ctx)` builds the loss term; `evaluators` maps evaluator kinds to factories
  `(**options) -> Evaluator`; `validate(config)` checks what the task needs of a whole config.
  """

  name: str
  head: str  # the model head (models.crucible.ALL_HEADS) whose outputs the task reads
  outputs: tuple[str, ...]  # model output keys the terms and evaluators read
  modalities: Callable[[str], frozenset[str]]
  term: Callable[[str, str, TermContext], TermFn] | None = None
  evaluators: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
  validate: Callable[[Any], None] | None = None
  source: str | None = None  # the data source that registered it (None: generic)


@dataclasses.dataclass(frozen=True)
class SourceExtras:
  """What a data source adds to generic tasks: VQA question-type names (plots), reference images (imagine)."""

  question_types: tuple[str, ...] = ()
  reference_glyphs: Callable[[Any], np.ndarray] | None = None  # data config -> [labels, H, W] images


_TASKS: dict[str, Task] = {}
_EXTRAS: dict[str, SourceExtras] = {}


def register(task: Task) -> Task:
  """Add `task`; registering the same name again (a re-imported module) replaces it, another name's kind clashes."""
  for kind in task.evaluators:
    owner = next((t.name for t in _TASKS.values() if kind in t.evaluators and t.name != task.name), None)
    if owner is not None:
      raise ValueError(f"task {task.name!r}: evaluator kind {kind!r} is already registered by task {owner!r}")
  _TASKS[task.name] = task
  return task


def register_source(name: str, extras: SourceExtras) -> None:
  """What data source `name` adds to generic tasks."""
  _EXTRAS[name] = extras


def source_extras(name: str) -> SourceExtras:
  """The extras data source `name` registered (none: empty)."""
  return _EXTRAS.get(name, SourceExtras())


def names() -> tuple[str, ...]:
  """Registered task names, in registration order."""
  return tuple(_TASKS)


def get(name: str) -> Task:
  """The task `name`; ValueError listing the registered ones."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; registered: {sorted(_TASKS)} (a data source's own tasks register when "
                     f"its config is validated)")
  return _TASKS[name]


def task_of_term(key: str) -> tuple[Task, str]:
  """(task, arg) of an objective term key `task[/arg]`."""
  name, _, arg = key.partition("/")
  return get(name), arg


def evaluator_task(kind: str) -> Task:
  """The task registering evaluator `kind`; ValueError listing the known kinds."""
  for task in _TASKS.values():
    if kind in task.evaluators:
      return task
  raise ValueError(f"unknown evaluator {kind!r}; known: {sorted(k for t in _TASKS.values() for k in t.evaluators)}")


def evaluator_factory(kind: str) -> Callable[..., Any]:
  """The factory of evaluator `kind`; ValueError listing the known kinds."""
  return evaluator_task(kind).evaluators[kind]


def one_modality(task: str) -> Callable[[str], frozenset[str]]:
  """`modalities` of a task whose arg is one modality (`pretrain/image`)."""
  def modalities(arg: str) -> frozenset[str]:
    if arg not in MODALITIES:
      raise ValueError(f"objective term {task}/{arg!r}: expected {task}/<m>, m in {MODALITIES}")
    return frozenset({arg})
  return modalities


def fixed(task: str, needs: Sequence[str]) -> Callable[[str], frozenset[str]]:
  """`modalities` of a task that takes no arg and needs `needs`."""
  def modalities(arg: str) -> frozenset[str]:
    if arg:
      raise ValueError(f"objective term {task}/{arg}: {task!r} takes no '/<arg>'")
    return frozenset(needs)
  return modalities
