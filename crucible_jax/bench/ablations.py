"""The ablation table: each DigitWorld ablation trained with the Trainer, measured beside the original claims.

Joint-task accuracy = mean of fused accuracy, VQA accuracy and strict retrieval R@1 on the test split. Compute =
XLA FLOPs/sample of the compiled eval forward and joint-stage train step. Convergence = the first val evaluation
(every `ablation.eval_every` steps) at which a run's val fused accuracy reaches the full run's final val value.
"""

import json
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from crucible_jax.bench.common import device_info
from crucible_jax.bench.routing import evaluate_joint, joint_metrics, program_flops
from crucible_jax.config import load_experiment
from crucible_jax.tasks import build_evaluators

EXPERIMENT = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "digit_world_ablations.py")
CLAIMS = {  # variant -> (what changes against `full`, claimed change in %)
    "no_cross_attention": ("joint-task accuracy", -18.7),
    "no_routing": ("compute (FLOPs/sample)", +32.0),
    "single_stage": ("steps to reach full's final val fused accuracy", +40.0),
}


def train_one(variant: str, workdir: pathlib.Path, overrides: Sequence[str]) -> dict[str, Any]:
  """Train one ablation (resuming from `workdir`), with a val fused-accuracy curve; test metrics and FLOPs."""
  from crucible_jax.train.loop import Trainer
  from crucible_jax.data import loader, registry
  from crucible_jax.train.evaluate import evaluate_split
  config = load_experiment(f"{EXPERIMENT}:{variant}", list(overrides))
  trainer = Trainer(config, workdir)
  curve_file = workdir / "val_fused_curve.json"  # survives a resume: a finished run is not trained (or hooked) again
  curve: list[tuple[int, float]] = [tuple(p) for p in json.loads(curve_file.read_text())] if curve_file.exists() else []
  fused_step = trainer.experiment.eval_step(("fused",))  # one jitted function: compiled once for the curve

  def val_hook(info) -> None:
    if "fused" not in dict(trainer.plans[-1].cfg.objective) or info.stage != trainer.plans[-1].name:
      return  # the fused head is trained only in the last stage; earlier it is untrained noise
    if curve and info.global_step <= curve[-1][0]:
      return  # already measured before the resume
    batches = registry.make_eval_batches(config.data, "val", batch_size=config.eval_batch_size)
    scores = evaluate_split(fused_step, info.state.params, batches, build_evaluators({"fused": {}}),
                            lambda b: loader.to_global_batch(b, trainer.experiment.batch_sharding))
    curve.append((info.global_step, scores["fused/accuracy"]))
    curve_file.write_text(json.dumps(curve))

  trainer.add_hook(val_hook, every=int(config.ablation.eval_every))
  try:
    results = trainer.run()
    params = trainer.restore_final_params()
  finally:
    trainer.close()
  exp = trainer.experiment
  forward_flops, train_flops, forward = program_flops(exp, params, int(config.eval_batch_size))
  scores = evaluate_joint(exp, lambda p, b: forward(p, b), params, config.data, "test", int(config.eval_batch_size))
  metrics = joint_metrics(scores, [tuple(p) for p in config.evals.retrieval.pairs])
  metrics["joint_accuracy"] = float(np.mean(list(metrics.values())))
  return {"metrics": metrics, "flops_per_sample": forward_flops, "train_flops_per_sample": train_flops,
          "val_fused_curve": curve, "steps": results["steps"], "train_wall_s": results["wall_s"]}


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
  """First step whose value reaches `target`, or None when the curve never does."""
  return next((step for step, value in curve if value >= target), None)


def table(runs: dict[str, dict]) -> dict[str, dict]:
  """Each ablation's measured change against `full`, beside the claimed one."""
  full = runs.get("full")
  rows = {}
  if full is None:
    return rows
  target = full["val_fused_curve"][-1][1] if full["val_fused_curve"] else float("nan")
  for variant, (what, claimed) in CLAIMS.items():
    if variant not in runs:
      continue
    run = runs[variant]
    if variant == "no_cross_attention":
      measured = 100 * (run["metrics"]["joint_accuracy"] / full["metrics"]["joint_accuracy"] - 1)
      detail = {k: (full["metrics"][k], run["metrics"][k]) for k in full["metrics"]}
    elif variant == "no_routing":
      measured = 100 * (run["flops_per_sample"] / full["flops_per_sample"] - 1)
      detail = {"train_flops_change_%": 100 * (run["train_flops_per_sample"] / full["train_flops_per_sample"] - 1),
                "joint_accuracy": (full["metrics"]["joint_accuracy"], run["metrics"]["joint_accuracy"])}
    else:
      full_steps = steps_to_reach(full["val_fused_curve"], target)
      steps = steps_to_reach(run["val_fused_curve"], target)
      measured = None if steps is None or not full_steps else 100 * (steps / full_steps - 1)
      detail = {"target_val_fused_accuracy": target, "full_steps": full_steps, "single_stage_steps": steps,
                "single_stage_final": run["val_fused_curve"][-1][1] if run["val_fused_curve"] else None}
    rows[variant] = {"what": what, "claimed_%": claimed, "measured_%": measured, "detail": detail}
  return rows


def run_ablations(workdir: pathlib.Path, variants: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Train the variants (each under workdir/<variant>, resumable), print the table, write workdir/ablations.json."""
  workdir.mkdir(parents=True, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  runs = {v: train_one(v, workdir / v, overrides) for v in variants}
  rows = table(runs)
  print(f"{'ablation':<20} {'what':<48} {'claimed':>8} {'measured':>9}")
  for variant, row in rows.items():
    measured = "not reached" if row["measured_%"] is None else f"{row['measured_%']:+.1f}%"
    print(f"{variant:<20} {row['what']:<48} {row['claimed_%']:+.1f}% {measured:>9}")
  for variant, run in runs.items():
    print(variant, json.dumps(run["metrics"]), f"fwd {run['flops_per_sample']:.3g} FLOPs/sample")
  report = {**device_info(), "runs": runs, "table": rows, "overrides": list(overrides)}
  (workdir / "ablations.json").write_text(json.dumps(report, indent=2, default=float))
  return report
