"""The ablation table and the routing summary compute their changes from the runs they are given."""

import pytest

from crucible_jax.bench import ablations, routing


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
