"""Dynamic curriculum: per-sample loss weights from a difficulty prior and a competence that grows with the step.

Competence-based curriculum (Platanios et al., NAACL 2019): a sample of difficulty d in [0, 1] is admitted at
step t when d <= c(t), c(0) = `start`, c(`ramp_steps`) = 1; samples not yet admitted keep `min_weight`. The
difficulty of a DigitWorld sample is its digit count (a static prior: longer strings are harder to read, hear and
transcribe). The weight is a pure function of (step, recipe), computed in the grain pipeline from the element's
position, so the grain iterator state alone restores it on resume, with any number of workers.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

KINDS = ("none", "length")
PACINGS = ("linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class CurriculumSpec:
  """Validated curriculum settings."""

  kind: str = "none"  # "none" | "length"
  start: float = 0.0  # competence at step 0 (share of the difficulty range admitted)
  ramp_steps: int = 1000  # steps until every difficulty is admitted
  pacing: str = "sqrt"  # competence growth: "linear" | "sqrt" (fast first, as in Platanios et al.)
  min_weight: float = 0.0  # loss weight of a sample not yet admitted
  max_digits: int = 4  # longest digit string (difficulty 1)


def default_curriculum_config() -> ml_collections.ConfigDict:
  """`config.curriculum` defaults: off."""
  cfg = ml_collections.ConfigDict()
  cfg.kind = "none"  # "none" | "length" (weights samples by digit count, admitting longer strings over time)
  cfg.start = 0.0  # competence at the run's first step, in [0, 1] (0 = only 1-digit strings)
  cfg.ramp_steps = 1000  # global steps until every string length has full weight
  cfg.pacing = "sqrt"  # competence growth: "linear" | "sqrt"
  cfg.min_weight = 0.0  # loss weight of strings longer than the current competence admits, in [0, 1]
  return cfg


def curriculum_spec(cfg: ml_collections.ConfigDict | Mapping | None, max_digits: int) -> CurriculumSpec:
  """Validate `config.curriculum` (ValueError naming the field); None means kind 'none'."""
  if cfg is None:
    return CurriculumSpec(max_digits=max_digits)
  cfg = dict(cfg)
  known = {f.name for f in dataclasses.fields(CurriculumSpec)} - {"max_digits"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"curriculum has unknown fields {unknown}; known: {sorted(known)}")
  spec = CurriculumSpec(**cfg, max_digits=max_digits)
  if spec.kind not in KINDS:
    raise ValueError(f"curriculum.kind={spec.kind!r}; choose from {KINDS}")
  if spec.pacing not in PACINGS:
    raise ValueError(f"curriculum.pacing={spec.pacing!r}; choose from {PACINGS}")
  if not 0.0 <= spec.start <= 1.0:
    raise ValueError(f"curriculum.start={spec.start} must be in [0, 1]")
  if not 0.0 <= spec.min_weight <= 1.0:
    raise ValueError(f"curriculum.min_weight={spec.min_weight} must be in [0, 1]")
  if int(spec.ramp_steps) <= 0:
    raise ValueError(f"curriculum.ramp_steps={spec.ramp_steps} must be a positive number of steps")
  return spec


def competence(step: int, spec: CurriculumSpec) -> float:
  """c(step) in [start, 1]: the largest difficulty admitted at `step`."""
  progress = min(max(step, 0) / spec.ramp_steps, 1.0)
  if spec.pacing == "linear":
    return spec.start + (1.0 - spec.start) * progress
  return min(1.0, math.sqrt(progress * (1.0 - spec.start ** 2) + spec.start ** 2))


def difficulty(num_digits: int, max_digits: int) -> float:
  """Static prior: (digits - 1) / (max_digits - 1), so 1 digit = 0 and the longest string = 1."""
  return 0.0 if max_digits <= 1 else (num_digits - 1) / (max_digits - 1)


def sample_weight(num_digits: int, step: int, spec: CurriculumSpec) -> float:
  """The curriculum's loss weight of one sample at `step` (1 when the curriculum is off)."""
  if spec.kind == "none" or num_digits <= 0:
    return 1.0
  admitted = difficulty(num_digits, spec.max_digits) <= competence(step, spec) + 1e-9
  return 1.0 if admitted else spec.min_weight


def weight_sample(step: int, sample: dict[str, Any], *, spec: CurriculumSpec) -> dict[str, Any]:
  """Scale `sample['weight']` by the curriculum's weight at `step` (the pipeline's per-sample hook)."""
  sample["weight"] = np.float32(sample["weight"] * sample_weight(int(sample["num_digits"]), step, spec))
  return sample


def sample_hook(config: ml_collections.ConfigDict) -> Callable[[int, dict[str, Any]], dict[str, Any]] | None:
  """The `make_train_iterator(sample_hook=...)` of `config.curriculum`, or None when it is off or absent."""
  spec = curriculum_spec(config.get("curriculum"), int(config.data.max_digits))
  return None if spec.kind == "none" else functools.partial(weight_sample, spec=spec)
