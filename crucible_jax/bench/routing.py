"""`crucible bench routing`: compute the modality router saves against the joint-task quality it keeps.

For each DigitWorld variant (clean, corrupted) one routed run is trained with the Trainer (at the config's routing
budget), then the same params are evaluated with the router at every bench budget and with routing off (all
modalities on, the reference). FLOPs come from XLA's cost analysis of the compiled eval forward and joint-stage
train step (static capacities: they depend on the budget, not the data); wall time is the compiled forward's.
Retrieval R@1 is strict: a query whose modality the router skipped counts as a miss.
"""

import json
import pathlib
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from crucible_jax.bench.common import compiled_flops, device_info, time_call
from crucible_jax.common_types import MODALITIES, present_key
from crucible_jax.data import loader, registry
from crucible_jax.tasks import build_evaluators
from crucible_jax.models.router import budget_fractions
from crucible_jax.train.evaluate import evaluate_split
from crucible_jax.train.setup import Experiment

JOINT_EVALS = ("retrieval", "vqa", "fused")  # the joint tasks scored at every budget
DEFAULTS = dict(budgets=(1.0, 0.75, 0.5, 0.35), variants=("clean", "corrupted"), split="test", timing_iters=5,
                tolerance=0.01, workdir=str(pathlib.Path(tempfile.gettempdir()) / "crucible_bench_routing"))


class RoutingUsage:
  """Evaluator-like: per modality, the share of samples carrying it that the router encoded, clean vs corrupted."""

  heads: tuple[str, ...] = ()

  def __init__(self, modalities: tuple[str, ...]):
    self.modalities = modalities
    self.counts = {m: np.zeros((2, 2)) for m in modalities}  # [corrupted?, encoded?] sample counts

  def update(self, outputs: dict, batch: dict) -> None:
    real = np.asarray(batch["weight"]) > 0
    for m in self.modalities:
      carried = real & np.asarray(batch[present_key(m)], bool)
      encoded = np.asarray(outputs["present"][m], bool)
      corrupted = np.asarray(batch.get(f"{m}_corrupted", np.zeros_like(carried)), bool)
      for c in (0, 1):
        for e in (0, 1):
          self.counts[m][c, e] += np.sum(carried & (corrupted == c) & (encoded == e))

  def result(self) -> dict[str, float]:
    out = {}
    for m, n in self.counts.items():
      out[f"coverage/{m}"] = n[:, 1].sum() / max(n.sum(), 1)
      for c, name in ((0, "clean"), (1, "corrupted")):
        if n[c].sum():
          out[f"usage/{m}/{name}"] = n[c, 1] / n[c].sum()
    return out


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The bench's knobs: DEFAULTS overridden by `config.routing_bench`; budgets checked against the modalities."""
  extra = dict(config.get("routing_bench", {}))
  unknown = sorted(set(extra) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"routing_bench has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
  out = {**DEFAULTS, **extra}
  if not out["budgets"]:
    raise ValueError("routing_bench.budgets is empty")
  try:
    out["budgets"] = tuple(budget_fractions(b, tuple(config.model.modalities)) for b in out["budgets"])
  except ValueError as e:
    raise ValueError(f"routing_bench.budgets: {e}") from None
  return out


def variant_config(config: ml_collections.ConfigDict, variant: str,
                   budget: Mapping[str, float] | None) -> ml_collections.ConfigDict:
  """`config` on data `variant`, routed at `budget` ({modality: fraction}), or routing off (budget None)."""
  c = config.copy_and_resolve_references()
  c.data.variant = variant
  with c.unlocked():
    c.eval_splits, c.plots = (), False
    c.evals = ml_collections.ConfigDict({k: v for k, v in c.evals.to_dict().items() if k in JOINT_EVALS})
  if budget is None:
    c.model.routing.enabled = False
    for name in c.stage_order:
      objective = dict(c.stages[name].objective)
      c.stages[name].objective = {k: v for k, v in objective.items() if not k.startswith("routing/")}
  elif not c.model.routing.enabled:
    raise ValueError("bench routing needs model.routing.enabled (use experiments/digit_world.py:routed)")
  else:
    c.model.routing.budget.update(budget_fractions(budget, tuple(c.model.modalities)))
  return c


def train_variant(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Any, dict]:
  """Trained params of one routed run (resumed/reused from `workdir` when it holds one) and its train wall time."""
  from crucible_jax.train.loop import Trainer  # the trainer touches files; import it only when training
  trainer = Trainer(config, workdir)
  try:
    results = trainer.run()
    return trainer.restore_final_params(), {"train_wall_s": results["wall_s"], "train_steps": results["steps"]}
  finally:
    trainer.close()


def joint_metrics(scores: dict[str, float], pairs: list[tuple[str, str]]) -> dict[str, float]:
  """Fused accuracy, VQA accuracy and strict mean retrieval R@1 (skipped queries count as misses)."""
  strict = [scores.get(f"{q}_to_{c}/R@1", 0.0) * scores[f"coverage/{q}"] for q, c in pairs]
  return {"fused_accuracy": scores.get("fused/accuracy", float("nan")),
          "vqa_accuracy": scores.get("vqa/accuracy", float("nan")), "retrieval_R@1": float(np.mean(strict))}


def evaluate_joint(exp: Experiment, eval_step: Any, params: Any, data_cfg: ml_collections.ConfigDict, split: str,
                   batch_size: int) -> dict[str, float]:
  """The joint evaluators plus RoutingUsage over a whole split (scores keyed `task/metric`, `usage/...`)."""
  evaluators = {**build_evaluators(dict(exp.config.evals)), "usage": RoutingUsage(tuple(exp.config.model.modalities))}
  batches = registry.make_eval_batches(data_cfg, split, batch_size=batch_size)
  with jax.set_mesh(exp.mesh):
    return evaluate_split(eval_step, params, batches, evaluators,
                          lambda b: loader.to_global_batch(b, exp.batch_sharding))


def program_flops(exp: Experiment, params: Any, eval_batch: int) -> tuple[float, float, Any]:
  """(eval-forward FLOPs/sample, last-stage train-step FLOPs/sample, compiled forward) from XLA cost analysis."""
  heads = tuple(sorted({h for e in build_evaluators(dict(exp.config.evals)).values() for h in e.heads}))
  eval_step, plan = exp.eval_step(heads), exp.plans[-1]
  program = exp.stage_program(plan)
  batch = jax.device_put(exp.example_batch(eval_batch), exp.batch_sharding)
  train_batch = jax.device_put(exp.example_batch(), exp.batch_sharding)
  with jax.set_mesh(exp.mesh):
    forward = eval_step.lower(params, batch).compile()
    train = program.train_step.lower(program.abstract, train_batch, jax.random.key(0)).compile()
  return compiled_flops(forward) / eval_batch, compiled_flops(train) / int(exp.config.batch_size), forward


def measure_budget(config: ml_collections.ConfigDict, budget: dict[str, float] | None, trained: dict,
                   s: dict) -> dict:
  """FLOPs/sample (forward, train step), forward wall time and joint metrics of every variant's params at `budget`."""
  exp = Experiment(variant_config(config, s["variants"][0], budget))
  eval_batch = int(config.eval_batch_size)
  forward_flops, train_flops, forward = program_flops(exp, trained[s["variants"][0]], eval_batch)
  row = {"budget": budget_label(budget), "flops_per_sample": forward_flops,
         "train_flops_per_sample": train_flops, "variants": {}}
  pairs = [tuple(p) for p in exp.config.evals.retrieval.pairs]
  for variant, params in trained.items():
    data_cfg = variant_config(config, variant, budget).data
    real = next(iter(registry.make_eval_batches(data_cfg, s["split"], batch_size=eval_batch)))
    real = loader.to_global_batch(real, exp.batch_sharding)
    with jax.set_mesh(exp.mesh):
      wall = time_call(lambda: forward(params, real), iters=int(s["timing_iters"]))
    # The compiled forward is the eval step's program: reuse it for the whole split.
    scores = evaluate_joint(exp, lambda p, b: forward(p, b), params, data_cfg, s["split"], eval_batch)
    usage = {k: v for k, v in scores.items() if k.startswith(("usage/", "coverage/"))}
    row["variants"][variant] = {"wall_s": wall, "metrics": joint_metrics(scores, pairs), "usage": usage,
                                "scores": {k: v for k, v in scores.items() if k not in usage}}
  return row


def budget_label(budget: dict[str, float] | None) -> float | str | dict[str, float]:
  """How a row names its budget in the JSON: "all_on", the one fraction every modality shares, or the mapping."""
  if budget is None:
    return "all_on"
  return next(iter(budget.values())) if len(set(budget.values())) == 1 else dict(budget)


def summarise(rows: list[dict], variants: tuple[str, ...], tolerance: float) -> dict:
  """Per variant: each budget's FLOPs reduction against all-on and metric changes; best reduction within tolerance."""
  dense = rows[0]
  out = {}
  for variant in variants:
    ref = dense["variants"][variant]["metrics"]
    budgets, best = [], 0.0
    for row in rows[1:]:
      v = row["variants"][variant]
      delta = {k: v["metrics"][k] - ref[k] for k in ref}
      reduction = 1.0 - row["flops_per_sample"] / dense["flops_per_sample"]
      budgets.append({"budget": row["budget"], "flops_per_sample": row["flops_per_sample"],
                      "flops_reduction": reduction,
                      "train_flops_reduction": 1.0 - row["train_flops_per_sample"] / dense["train_flops_per_sample"],
                      "wall_s": v["wall_s"], "metrics": v["metrics"], "metric_change": delta, "usage": v["usage"]})
      if all(d >= -tolerance for d in delta.values()):
        best = max(best, reduction)
    out[variant] = {"all_on": {"flops_per_sample": dense["flops_per_sample"],
                               "train_flops_per_sample": dense["train_flops_per_sample"],
                               "wall_s": dense["variants"][variant]["wall_s"], "metrics": ref},
                    "budgets": budgets, "best_flops_reduction_within_1pt": best}
  return out


def plot_usage(variants: dict, path: pathlib.Path) -> None:
  """Bars: the router's usage of each modality on corrupted vs clean samples of the corrupted variant, per budget."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  budgets = [b for b in variants.get("corrupted", {}).get("budgets", []) if b["budget"] != 1.0]
  fig, axes = plt.subplots(1, max(len(budgets), 1), figsize=(4 * max(len(budgets), 1), 3.2), squeeze=False)
  for ax, b in zip(axes[0], budgets):
    x = np.arange(len(MODALITIES))
    for offset, kind in ((-0.2, "clean"), (0.2, "corrupted")):
      ax.bar(x + offset, [b["usage"].get(f"usage/{m}/{kind}", 0.0) for m in MODALITIES], 0.4, label=kind)
    ax.set_xticks(x, MODALITIES)
    ax.set_ylim(0, 1)
    ax.set_title(f"budget {b['budget']}", fontsize=8 if isinstance(b["budget"], dict) else None)
    ax.set_ylabel("share of samples encoded")
  axes[0][0].legend()
  fig.suptitle("router usage on the corrupted variant: clean vs corrupted samples")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train one routed run per variant, then measure all-on and every budget; JSON-ready report (+ usage PNG)."""
  s = settings(config)
  workdir = pathlib.Path(s["workdir"])
  workdir.mkdir(parents=True, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # the variants' identical steps compile once
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  trained, training = {}, {}
  for variant in s["variants"]:
    train_budget = {m: config.model.routing.budget[m] for m in config.model.modalities}
    cfg = variant_config(config, variant, train_budget)
    trained[variant], training[variant] = train_variant(cfg, workdir / variant)
  rows = [measure_budget(config, None, trained, s)]
  rows += [measure_budget(config, b, trained, s) for b in s["budgets"]]
  variants = summarise(rows, tuple(s["variants"]), float(s["tolerance"]))
  plot = workdir / "routing_usage.png"
  plot_usage(variants, plot)
  report = {**device_info(), "variants": variants, "training": training, "usage_plot": str(plot),
            "train_budget": dict(config.model.routing.budget), "settings": s,
            "sizes": {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
                      "steps": {n: int(config.stages[n].steps) for n in config.stage_order},
                      "width": int(config.model.image.width), "depth": int(config.model.image.depth),
                      "train_size": int(config.data.train_size), "test_size": int(config.data.test_size)},
            "note": ("one routed run per variant trained at train_budget; every budget (and all_on = routing off, "
                     "the reference) evaluates those same params; retrieval_R@1 = mean over pairs, skipped queries "
                     "count as misses; flops from XLA cost analysis of compiled programs")}
  (workdir / "routing_bench.json").write_text(json.dumps(report, indent=2, default=float))
  return report
