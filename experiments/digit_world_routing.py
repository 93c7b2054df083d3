"""The routing benchmark's workload: the ablation table's routed run, trained long enough to read every modality.

`crucible bench routing --config experiments/digit_world_routing.py --json OUT` trains one routed run per DigitWorld
variant (clean, corrupted) and measures every budget below against all modalities on. At the ablation table's 700
steps the corrupted variant's image encoder barely reads (stage-1 digit accuracy <= 0.3), so there is little for a
router to keep; at 1,400 steps it reads. The router trains at a FLOPs-aware budget: captions are cheap (7% of the
forward FLOPs), so text is always encoded, and the costly towers are routed.
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import digit_world_ablations  # noqa: E402  (a sibling experiment file: this is its `full` run, longer)

TRAIN_BUDGET = {"image": 0.6, "audio": 0.4, "video": 0.4, "text": 1.0}  # share of each batch encoded in training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The routed three-stage run at 800 + 200 + 400 steps; `arg` is not used."""
  if arg:
    raise ValueError(f"digit_world_routing takes no variant, got {arg!r}")
  c = digit_world_ablations.get_config("full")
  for name, steps, warmup in (("unimodal", 800, 40), ("align", 200, 10), ("joint", 400, 20)):
    c.stages[name].update(steps=steps, warmup=warmup)
  c.model.routing.budget.update(TRAIN_BUDGET)
  c.routing_bench.budgets = (1.0, 0.75, 0.7, 0.65, 0.6, 0.5, TRAIN_BUDGET, {**TRAIN_BUDGET, "image": 0.55, "audio": 0.35,
                                                                        "video": 0.35})
  c.routing_bench.workdir = "/tmp/crucible_bench_routing_long"  # trained runs (reused when present)
  return c
