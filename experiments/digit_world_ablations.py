"""The DigitWorld ablation table, sized to finish on a laptop-class CPU.

`--config experiments/digit_world_ablations.py:VARIANT`, VARIANT one of: full (router on, cross-attention, three
stages), no_cross_attention, no_routing, single_stage. Sizes (all variants): the default run's encoders (width 64,
depth 2, conv stems), batch 32, 4,000 train / 256 val / 512 test samples, stages 400 + 100 + 200 steps
(single_stage: one stage of 700). Smaller encoders do not learn to read in that many steps, and an ablation of
models that cannot read measures nothing.

Run the whole table: `python experiments/digit_world_ablations.py --workdir W [--variants a,b] [--config.x=v ...]`
(prints it beside the original claims and writes W/ablations.json; see crucible_jax/bench/ablations.py).
"""

import argparse
import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import digit_world  # noqa: E402  (a sibling experiment file: the ablations are variants of it)

ABLATIONS = ("full", "no_cross_attention", "no_routing", "single_stage")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """One ablation variant of the routed three-stage DigitWorld run at CPU size (module docstring)."""
  variant = arg or "full"
  if variant not in ABLATIONS:
    raise ValueError(f"unknown ablation {variant!r}; known: {ABLATIONS}")
  c = digit_world.get_config("routed")
  c.data.update(train_size=4000, val_size=256, test_size=512, heldout_size=64)  # samples per split
  c.eval_batch_size = 128  # examples per eval step
  c.checkpoint.every = 1000  # steps between saves (only the final save matters here)
  c.log_every = 50  # steps between metric rows
  for name, steps, warmup in (("unimodal", 400, 40), ("align", 100, 10), ("joint", 200, 20)):
    c.stages[name].update(steps=steps, warmup=warmup)
  c.evals = dict(retrieval=dict(pairs=digit_world.PAIRS), vqa={}, fused={})  # the joint tasks
  c.eval_splits = ("test",)  # evaluated at the end
  c.ablation = dict(name=variant, eval_every=50)  # variant; steps between val evaluations (convergence curve)
  if variant == "no_cross_attention":
    c.model.fusion.cross_attention = False
  if variant == "no_routing":
    c.model.routing.enabled = False
    for name in c.stage_order:
      c.stages[name].objective = {k: v for k, v in c.stages[name].objective.items() if not k.startswith("routing/")}
  if variant == "single_stage":
    digit_world.as_single_stage(c)
  return c


def main(argv: list[str] | None = None) -> int:
  """Train every requested ablation under --workdir and print the table beside the claims."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variants", default=",".join(ABLATIONS), help="comma list of " + ", ".join(ABLATIONS))
  args, overrides = parser.parse_known_args(argv)
  from crucible_jax.bench.ablations import run_ablations
  run_ablations(pathlib.Path(args.workdir), tuple(v for v in args.variants.split(",") if v), overrides)
  return 0


if __name__ == "__main__":
  sys.exit(main())
