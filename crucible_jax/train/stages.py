"""The three training stages as data, where a run is in them, and the parameter handoff between them.

Stage 1 `unimodal`: each encoder learns alone (digit-string prediction per modality).
Stage 2 `align`: CLIP/SigLIP contrastive alignment over modality pairs, encoders from stage 1.
Stage 3 `joint`: cross-modal attention, fusion and task heads end to end from stage 2.
"""

import dataclasses
import re
from typing import Any, Sequence

import flax.traverse_util
import ml_collections


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage of a run: its config and where it sits on the run's global step axis."""

  index: int
  name: str
  start: int  # global step at which the stage begins
  steps: int
  cfg: ml_collections.ConfigDict

  @property
  def end(self) -> int:
    return self.start + self.steps

  @property
  def accum_steps(self) -> int:
    """GradCache chunks per step (`accum_steps`, default 1 = plain autodiff)."""
    return int(self.cfg.get("accum_steps", 1))


def plan_stages(config: ml_collections.ConfigDict) -> list[StagePlan]:
  """The run's stages in order, with global step offsets."""
  plans, start = [], 0
  for index, name in enumerate(config.stage_order):
    stage = config.stages[name]
    plans.append(StagePlan(index, name, start, int(stage.steps), stage))
    start += int(stage.steps)
  return plans


def locate(plans: Sequence[StagePlan], global_step: int) -> tuple[int, int]:
  """(stage index, step within that stage) for a global step; past the end → (len(plans), 0)."""
  for plan in plans:
    if global_step < plan.end:
      return plan.index, global_step - plan.start
  return len(plans), 0


def handoff(previous: Any, fresh: Any, carry: Sequence[str]) -> Any:
  """Params for a new stage: paths matching a `carry` regex come from `previous`, the rest are fresh.

  This is the partial restore between stages: trained encoders move on, heads new to the stage start from
  their initialisation.
  """
  prev_flat = flax.traverse_util.flatten_dict(previous, sep="/")
  fresh_flat = flax.traverse_util.flatten_dict(fresh, sep="/")
  out = {}
  for path, value in fresh_flat.items():
    take = path in prev_flat and any(re.search(pattern, path) for pattern in carry)
    out[path] = prev_flat[path] if take else value
  return flax.traverse_util.unflatten_dict(out, sep="/")


def as_single_stage(config: ml_collections.ConfigDict) -> None:
  """Turn a staged config into the ablation: one stage, every objective at once, from scratch, same total steps."""
  objective, steps = {}, 0
  for name in config.stage_order:
    stage = config.stages[name]
    steps += int(stage.steps)
    for term, weight in stage.objective.items():
      objective[term] = max(weight, objective.get(term, 0.0))
  joint = config.stages[config.stage_order[-1]]
  config.stages["single"] = ml_collections.ConfigDict(dict(
      steps=steps, lr=joint.lr, warmup=joint.warmup, objective=objective, frozen=(), carry=()))
  config.stage_order = ("single",)
