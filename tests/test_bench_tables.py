"""The ablation table and the routing summary compute their changes from the runs they are given."""

import pytest

from crucible_jax.bench import ablations, routing
from crucible_jax.config import load_experiment


def _run(joint: float, flops: float, curve: list[tuple[int, float]]) -> dict:
  return {"metrics": {"joint_accuracy": joint}, "flops_per_sample": flops, "train_flops_per_sample": 3 * flops,
          "val_fused_curve": curve}


def test_ablation_table_measures_each_change_against_full():
  runs = {"full": _run(0.5, 100.0, [(500, 0.2), (600, 0.5), (700, 0.6)]),
          "no_cross_attention": _run(0.4, 90.0, [(700, 0.5)]),
          "no_routing": _run(0.7, 150.0, []),
          "single_stage": _run(0.3, 100.0, [(100, 0.1), (420, 0.6), (700, 0.7)])}
  rows = ablations.table(runs)
  assert rows["no_cross_attention"]["measured_%"] == pytest.approx(-20.0)
  assert rows["no_routing"]["measured_%"] == pytest.approx(50.0)
  assert rows["no_routing"]["detail"]["joint_accuracy"] == (0.5, 0.7)
  assert rows["single_stage"]["measured_%"] == pytest.approx(100 * (420 / 700 - 1))  # reached full's final 0.6
  runs["single_stage"]["val_fused_curve"] = [(350, 0.3), (700, 0.55)]
  never = ablations.table(runs)["single_stage"]
  assert never["measured_%"] is None and never["detail"]["single_stage_final"] == 0.55


def _budget_row(budget, flops: float, metrics: dict) -> dict:
  return {"budget": budget, "flops_per_sample": flops, "train_flops_per_sample": 2 * flops,
          "variants": {"corrupted": {"wall_s": 1.0, "metrics": metrics, "usage": {}}}}


def test_routing_summary_keeps_the_largest_saving_within_tolerance():
  rows = [_budget_row("all_on", 100.0, {"vqa": 0.80, "fused": 0.90}),
          _budget_row(0.75, 80.0, {"vqa": 0.80, "fused": 0.895}),  # -0.5 pt: within 1 pt
          _budget_row(0.5, 55.0, {"vqa": 0.78, "fused": 0.90}),  # -2 pt on vqa: outside
          _budget_row(0.35, 40.0, {"vqa": 0.70, "fused": 0.70})]
  summary = routing.summarise(rows, ("corrupted",), tolerance=0.01)["corrupted"]
  assert [b["flops_reduction"] for b in summary["budgets"]] == pytest.approx([0.20, 0.45, 0.60])
  assert summary["budgets"][1]["metric_change"]["vqa"] == pytest.approx(-0.02)
  assert summary["best_flops_reduction_within_1pt"] == pytest.approx(0.20)


def test_routing_bench_budgets_are_one_fraction_for_all_or_one_per_modality():
  per_modality = {"image": 0.3, "audio": 0.65, "video": 0.65, "text": 1.0}
  config = load_experiment("experiments/digit_world_ablations.py:full",
                           [f"--config.routing_bench.budgets=(0.5, {per_modality})"])
  uniform, mixed = routing.settings(config)["budgets"]
  assert uniform == dict.fromkeys(config.model.modalities, 0.5) and mixed == per_modality
  assert dict(routing.variant_config(config, "corrupted", mixed).model.routing.budget) == per_modality
  assert routing.variant_config(config, "corrupted", None).model.routing.enabled is False
  for bad, culprit in (({"image": 0.3}, "must name exactly"), ({**per_modality, "video": 0.0}, "'video'"),
                       (1.5, "'image'")):
    config.routing_bench.budgets = (bad,)
    with pytest.raises(ValueError, match=culprit):
      routing.settings(config)


def test_routing_summary_names_a_per_modality_budget_by_its_mapping():
  mixed = {"image": 0.3, "text": 1.0}
  rows = [_budget_row(routing.budget_label(None), 100.0, {"fused": 0.9}),
          _budget_row(routing.budget_label({"image": 0.5, "text": 0.5}), 60.0, {"fused": 0.85}),
          _budget_row(routing.budget_label(mixed), 70.0, {"fused": 0.895})]
  summary = routing.summarise(rows, ("corrupted",), tolerance=0.01)["corrupted"]
  assert [b["budget"] for b in summary["budgets"]] == [0.5, mixed]
  assert summary["best_flops_reduction_within_1pt"] == pytest.approx(0.30)
