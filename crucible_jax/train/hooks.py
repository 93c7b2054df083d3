"""Trainer hooks (levanter style: `trainer.add_hook(fn, every=n)`) and the metric sinks they feed."""

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass
class StepInfo:
  """What a hook sees after a step."""

  stage: str
  stage_step: int  # steps done in this stage
  stage_steps: int  # steps the stage will take
  global_step: int  # steps done in the whole run
  state: Any
  metrics: dict  # the step's metrics, device arrays (fetch only what you need)


Hook = Callable[[StepInfo], None]


@dataclasses.dataclass
class HookEntry:
  fn: Hook
  every: int


class MetricSink:
  """Metrics to JSONL and TensorBoard event files (tensorboardX; no TensorFlow), on process 0 only."""

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.history: list[dict] = []
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # deferred: heavy import, process 0 only
    self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, global_step: int, stage: str, scalars: dict[str, float]) -> None:
    row = {"step": global_step, "stage": stage, **scalars}
    self.history.append(row)
    if not self.enabled:
      return
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for key, value in scalars.items():
      self.tb.add_scalar(f"{stage}/{key}", value, global_step)

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def scalars_of(metrics: dict) -> dict[str, float]:
  """Fetch scalar metrics to host floats."""
  host = jax.device_get(metrics)
  return {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0}


class Progress:
  """One line per log step: stage, step, loss, steps/s and ETA."""

  def __init__(self, total_steps: int):
    self.total = total_steps
    self.start = time.perf_counter()
    self.last = (self.start, 0)

  def __call__(self, info: StepInfo, scalars: dict[str, float]) -> None:
    now = time.perf_counter()
    last_time, last_step = self.last
    rate = (info.global_step - last_step) / max(now - last_time, 1e-9)
    self.last = (now, info.global_step)
    eta = (self.total - info.global_step) / max(rate, 1e-9)
    done = int(20 * info.global_step / max(self.total, 1))
    bar = "#" * done + "." * (20 - done)
    extras = " ".join(f"{k}={v:.3g}" for k, v in scalars.items() if k.startswith("acc/"))
    if jax.process_index() == 0:
      print(f"[{bar}] {info.stage} {info.stage_step}/{info.stage_steps} loss={scalars.get('loss', float('nan')):.4f} "
            f"{rate:.2f} steps/s ETA {eta:.0f}s {extras}", file=sys.stderr, flush=True)
