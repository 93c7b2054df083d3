"""Compiled memory of a contrastive stage's train step, plain and with GradCache at accum_steps k (XLA's stats).

`python -m crucible_jax.bench.grad_cache --config experiments/digit_world.py --stage align --batch 512
--accum 1 2 4 8 --json OUT [--config.KEY=VALUE ...]` compiles (never runs) each step on this process's devices
and writes one JSON object: per variant XLA's temp (activations and scratch), argument, output and alias bytes,
and `peak_bytes` = temp + argument + output - alias (what the program holds at most while it runs).
"""

import argparse
import json
import pathlib
import sys
from typing import Any

import jax

from crucible_jax import load_experiment
from crucible_jax.bench.common import device_info
from crucible_jax.train import grad_cache, stages as stages_lib, step as step_lib
from crucible_jax.train.setup import Experiment


def _stats(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  stats = {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
  stats["peak_bytes"] = stats["temp_bytes"] + stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"]
  return stats


def measure(config: Any, stage: str, accum: list[int]) -> dict[str, Any]:
  """Memory stats of `stage`'s compiled train step: `plain` (the trainer's autodiff) and `k=<k>` per GradCache k."""
  experiment = Experiment(config)
  plan = next((p for p in stages_lib.plan_stages(config) if p.name == stage), None)
  if plan is None:
    raise ValueError(f"no stage {stage!r} in stage_order {tuple(config.stage_order)}")
  _, frozen, heads, objective = experiment.stage_parts(plan)
  forward = step_lib.make_forward_fn(experiment.model, heads, frozen, experiment.rules, bool(plan.cfg.get("route", True)))
  loss_fn = lambda p, b, r: objective(forward(p, b, r), b)
  state = experiment.stage_program(plan).abstract
  batch = experiment.abstract_batch()
  rng = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype, sharding=experiment.replicated)
  variants = {"plain": None, **{f"k={k}": grad_cache.make_grad_cache_fn(forward, objective, k) for k in accum}}
  out = {"stage": stage, "batch_size": int(config.batch_size), **device_info(experiment.mesh)}
  with jax.set_mesh(experiment.mesh):
    for name, grad_fn in variants.items():
      step = jax.jit(step_lib.make_train_step(loss_fn, grad_fn=grad_fn), donate_argnums=0)
      out[name] = _stats(step.lower(state, batch, rng).compile())
      print(name, out[name], file=sys.stderr)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m crucible_jax.bench.grad_cache", description=__doc__)
  parser.add_argument("--config", required=True)
  parser.add_argument("--stage", default="align")
  parser.add_argument("--batch", type=int, required=True, help="global batch size")
  parser.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--json", required=True)
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.") and "=" in a]
  unknown = [a for a in rest if a not in overrides]
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)}")
  config = load_experiment(args.config, [*overrides, f"--config.batch_size={args.batch}"])
  result = measure(config, args.stage, args.accum)
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
