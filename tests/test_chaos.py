"""`crucible chaos` (issue 24, part 3): each fault of the campaign, on real `crucible train` children of a micro run
(DigitWorld :tiny, image only, one stage of 8 steps, a checkpoint every 2, int8-compressed gradients on conftest's 8
CPU devices), against one uninterrupted reference run shared by the module. Kills, an inf gradient, a full disk and
a damaged checkpoint share one workdir (`faults.combined`); the children share one compilation cache (`Runner`).

Faults already covered in-process elsewhere: a poisoned / scrambled / missing checkpoint file and an ENOSPC failing
the background save (tests/test_integrity.py), a truncated ArrayRecord split (test_integrity), a bad own-data file or
shard member, named or counted under `on_bad_record="skip"` (tests/test_own_data.py), the NaN policies on a diverging
run (tests/test_train.py). Here each fault runs end to end through the campaign's checks, and the final rerun must
finish with results and logged losses identical to the reference's.
"""

import pathlib

import numpy as np
import pytest

from crucible_jax import cli
from crucible_jax.chaos import faults as faults_lib
from crucible_jax.chaos import inject
from crucible_jax.chaos.campaign import table
from crucible_jax.chaos.runs import Runner, comparable
from crucible_jax.config import load_experiment
from crucible_jax.parallel.distributed import FAULT_ENV, fault_point

CONFIG = f"{pathlib.Path(__file__).parent.parent / 'experiments' / 'digit_world.py'}:tiny"
MICRO = ["--config.model.modalities=('image',)", "--config.stages.unimodal.objective={'pretrain/image': 1.0}",
         "--config.evals={'pretrain': {'modalities': ('image',)}}", "--config.stage_order=('unimodal',)",
         "--config.stages.unimodal.steps=8", "--config.stages.unimodal.warmup=2", "--config.checkpoint.every=2",
         "--config.checkpoint.keep=2", "--config.log_every=1", "--config.eval_splits=('val',)",
         "--config.compression.method=int8"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> faults_lib.Context:
  """The campaign's context after its uninterrupted reference run."""
  root = tmp_path_factory.mktemp("chaos")
  runner = Runner(CONFIG, MICRO, root, env={}, timeout_s=900)
  outcome = runner.train("reference", root / "reference")
  assert outcome.rc == 0, outcome.log[-3000:]
  reference = comparable(root / "reference")
  assert [k for k in reference if k.startswith("train/loss@")] == [f"train/loss@{s}" for s in range(1, 9)]
  return faults_lib.Context(runner, load_experiment(CONFIG, MICRO), root / "reference", reference,
                            np.random.default_rng(0))


def _passed(trials: list[faults_lib.Trial]) -> None:
  for trial in trials:
    assert trial.survived and not trial.lost, trial


def test_kill_points_start_with_the_first_save_and_are_distinct_ascending_steps(ctx):
  points = faults_lib.kill_points(ctx, 4)
  steps = [step for _, step in points]
  assert points[0] == ("save", 2) and steps == sorted(set(steps)) and len(steps) == 4 and steps[-1] <= 8, points


def test_kill_points_on_the_three_stage_tiny_run_cross_both_stage_boundaries(tmp_path):
  config = load_experiment(CONFIG, [])  # 3 stages of 30 steps, a save every 20 and at each stage's end
  tiny = faults_lib.Context(Runner(CONFIG, [], tmp_path, env={}), config, tmp_path, {}, np.random.default_rng(0))
  assert tiny.saves == [20, 30, 40, 60, 80, 90]
  points = faults_lib.kill_points(tiny, 6)
  boundaries = {("save", 20), ("save", 30), ("step", 31), ("save", 60), ("step", 61)}  # the first save, both stage ends
  assert boundaries < set(points) and len({s for _, s in points}) == 6 and points == sorted(points, key=lambda p: p[1])


def test_kills_in_saves_an_inf_gradient_a_full_disk_and_a_truncated_checkpoint_in_one_workdir_finish_identically(
    ctx):
  trials = faults_lib.combined(ctx)
  _passed(trials)
  assert [(t.fault, t.name) for t in trials] == [("kill9", "save@2"), ("kill9", "save@6"), ("nan", "inf_grad@3 abort"),
                                                 ("enospc", "save of step 4"), ("corrupt_ckpt", "truncate step 4")]
  kill_first, kill_third, inf, disk_full, corrupt = trials
  assert "save of step 2 uncommitted: True" in kill_first.detail and "resumed from global step 0" in kill_first.detail
  # save@6 first waits for save 4 to commit; 4 is then truncated, so the final run resumes mid-stage from 2 and
  # int8's error feedback is restored from a checkpoint.
  assert "save of step 6 uncommitted: True" in kill_third.detail and "resumed from global step 2" in kill_third.detail
  assert "nan_policy='abort'" in inf.detail and "newest checkpoint [2] predates step 3: True" in inf.detail
  assert "no space left on device" in disk_full.detail and "step 2, is untouched" in disk_full.detail
  assert "and step 2: True" in corrupt.detail and "results and logged losses identical" in corrupt.detail


def test_powersgd_killed_during_a_save_resumes_with_its_error_feedback_to_identical_results(ctx):
  (trial,) = faults_lib.compressed(ctx, None, methods=("powersgd",))
  _passed([trial])
  assert "resumed from global step 2" in trial.detail, trial


def test_a_byte_flipped_shard_is_named_before_the_first_step(ctx):
  (trial,) = faults_lib.bad_shard(ctx, None, damages=("flip",))
  _passed([trial])
  assert "is corrupt" in trial.detail and "checkpoints written: []" in trial.detail, trial


def test_a_nan_batch_is_skipped_and_counted(ctx):
  (trial,) = faults_lib.nan(ctx, 1)
  _passed([trial])
  assert trial.name == "nan_batch@3 skip" and "skipped steps logged: 1" in trial.detail, trial


def test_fault_specs_are_checked():
  with pytest.raises(ValueError, match=r"PROCESS:POINT\[@GLOBAL_STEP\]"):
    fault_point("step", 3, env={FAULT_ENV: "0:step@three"})
  fault_point("step", 3, env={FAULT_ENV: "0:step@4"})  # another step: still running
  fault_point("save", 4, env={FAULT_ENV: "0:step@4"})  # another point: still running
  with pytest.raises(ValueError, match="KIND@GLOBAL_STEP"):
    inject.parse("enospc@0")
  assert inject.parse("inf_grad@7") == ("inf_grad", 7)


def test_chaos_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x").write_text("")
  cases = [(["--faults", "kill9,meteor"], "meteor"), (["--trials", "0"], "--trials"),
           (["--workdir", str(tmp_path / "busy")], "not empty"), (["--config.checkpoint.keep=1"], "keep ≥ 2")]
  for extra, culprit in cases:
    argv = ["chaos", "--config", CONFIG, "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "o.json"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crucible: config error:") and culprit in err[0], err


def test_table_lists_every_fault_with_its_counts():
  report = {"faults": {"kill9": {"trials": 5, "survived": 5, "data_lost": 0},
                       "nan": {"trials": 4, "survived": 3, "data_lost": 1}}}
  assert table(report).splitlines()[2:] == ["| kill9 | 5 | 5 | 0 |", "| nan | 4 | 3 | 1 |"]
