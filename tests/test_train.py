"""The trainer end to end on DigitWorld :tiny — learning, resume exactness, restore on another mesh, NaN policy."""

import json
import pathlib
import signal
import threading

import jax
import numpy as np
import pytest

from crucible_jax.config import load_experiment
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.train import stages
from crucible_jax.train.loop import Preempted, Trainer

DIGIT_WORLD = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")
SHORT = ["--config.stage_order=('unimodal', 'align')", "--config.stages.unimodal.steps=6",
         "--config.stages.unimodal.warmup=2", "--config.stages.align.steps=6", "--config.stages.align.warmup=2",
         "--config.checkpoint.every=4", "--config.log_every=2", "--config.eval_splits=('val',)",
         "--config.checkpoint.async_save=false"]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _run(workdir, overrides=(), *, stop_at=None, mesh=None):
  """Run a trainer; with `stop_at`, the SIGTERM handler is invoked after that global step (as the signal would)."""
  config = load_experiment(f"{DIGIT_WORLD}:tiny", list(SHORT) + list(overrides))
  trainer = Trainer(config, workdir, mesh=mesh)
  if stop_at is not None:
    trainer.add_hook(lambda info: trainer._request_stop(signal.SIGTERM, None) if info.global_step == stop_at else None,
                     every=1)
  try:
    results = trainer.run()
    return trainer, results
  finally:
    trainer.close()


_COMPILES: list[tuple[str, str]] | None = None  # (program, thread) of each XLA compile while recording


def _record_compile(event: str, duration: float, **kwargs) -> None:
  if _COMPILES is not None and event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append((kwargs.get("fun_name", ""), threading.current_thread().name))


jax.monitoring.register_event_duration_secs_listener(_record_compile)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  global _COMPILES
  workdir = tmp_path_factory.mktemp("straight")
  _COMPILES = []
  try:
    trainer, results = _run(workdir)
    trainer.compiles = list(_COMPILES)
  finally:
    _COMPILES = None
  return workdir, trainer, results


def test_the_second_stage_step_compiles_once_in_the_background_and_is_reused(uninterrupted):
  _, trainer, _ = uninterrupted
  steps = [thread for name, thread in trainer.compiles if name == "jit(train_step)"]
  assert len(steps) == 2, trainer.compiles  # one program per stage: the stage's call found its program compiled
  assert steps.count(threading.main_thread().name) == 1 and any(t.startswith("stage-compile") for t in steps), steps


def test_results_json_and_metrics_written(uninterrupted):
  workdir, trainer, results = uninterrupted
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["steps"] == 12 and saved["wall_s"] > 0
  assert "val/image_to_text/R@1" in saved and 0.0 <= saved["val/image_to_text/R@1"] <= 1.0
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert {r["stage"] for r in rows} == {"unimodal", "align"}
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  written = json.loads((workdir / "config.json").read_text())
  assert written["stages"]["unimodal"]["steps"] == 6 and written["batch_size"] == trainer.config.batch_size


def test_sigterm_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  _, straight, straight_results = uninterrupted
  with pytest.raises(Preempted, match="global step 9"):
    _run(tmp_path, stop_at=9)  # mid-stage 2: the stage-1 handoff and the iterator position must both survive
  resumed, resumed_results = _run(tmp_path)
  straight_params = straight.restore_final_params()
  resumed_params = resumed.restore_final_params()
  for a, b in zip(_leaves(straight_params), _leaves(resumed_params)):
    np.testing.assert_array_equal(a, b)
  for key, value in straight_results.items():
    if key != "wall_s":
      assert resumed_results[key] == value, key


def test_restore_on_a_different_mesh(uninterrupted):
  workdir, straight, _ = uninterrupted
  config = load_experiment(f"{DIGIT_WORLD}:tiny", SHORT + ["--config.mesh.data=4"])
  small = Trainer(config, workdir, mesh=build_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:4]),
                  read_only=True)  # another mesh reads the workdir; training on it would need --allow-config-change
  try:
    params = small.restore_final_params()
  finally:
    small.close()
  leaf = jax.tree.leaves(params)[0]
  assert len(leaf.sharding.device_set) == 4
  for a, b in zip(_leaves(straight.restore_final_params()), _leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_stage_handoff_carries_only_matching_paths():
  previous = {"image_encoder": {"w": np.ones(2)}, "vqa_head": {"w": np.ones(2)}}
  fresh = {"image_encoder": {"w": np.zeros(2)}, "vqa_head": {"w": np.zeros(2)}, "new": {"w": np.zeros(1)}}
  out = stages.handoff(previous, fresh, carry=("_encoder",))
  np.testing.assert_array_equal(out["image_encoder"]["w"], 1)
  np.testing.assert_array_equal(out["vqa_head"]["w"], 0)
  assert "new" in out


def test_carry_pattern_that_matches_no_param_is_rejected(tmp_path):
  config = load_experiment(f"{DIGIT_WORLD}:tiny", SHORT + ["--config.stages.align.carry=('^no_such_module',)"])
  with pytest.raises(ValueError, match="stages.align.carry"):
    Trainer(config, tmp_path)


def test_align_handoff_carries_the_real_encoders_and_refreshes_the_rest(uninterrupted):
  _, trainer, _ = uninterrupted
  experiment = trainer.experiment
  previous = experiment.init_params(jax.random.key(1))
  fresh = experiment.init_params(jax.random.key(2))
  plan = next(p for p in experiment.plans if p.name == "align")
  out = stages.handoff(previous, fresh, tuple(plan.cfg.carry))
  import flax.traverse_util
  flat = {k: flax.traverse_util.flatten_dict(t, sep="/") for k, t in (("out", out), ("prev", previous), ("new", fresh))}
  encoder_paths = [p for p in flat["out"] if p.startswith("encoders_")]
  head_paths = [p for p in flat["out"] if p.startswith("projections_")]
  assert encoder_paths and head_paths
  for path in encoder_paths:
    np.testing.assert_array_equal(flat["out"][path], flat["prev"][path])
  for path in head_paths:
    np.testing.assert_array_equal(flat["out"][path], flat["new"][path])


def test_non_finite_loss_abort_policy_stops_with_a_clear_message(tmp_path):
  # A learning rate near f32's max makes the first update overflow the params, so later losses are NaN.
  overrides = ["--config.nan_policy=abort", "--config.stages.unimodal.lr=1e38", "--config.stage_order=('unimodal',)"]
  with pytest.raises(FloatingPointError, match="nan_policy='abort'"):
    _run(tmp_path, overrides)


def test_non_finite_loss_skip_policy_counts_skips_and_diverged_params_fail_evaluation_clearly(tmp_path):
  overrides = ["--config.nan_policy=skip", "--config.stages.unimodal.lr=1e38", "--config.stage_order=('unimodal',)"]
  with pytest.raises(FloatingPointError, match="not finite"):
    _run(tmp_path, overrides)  # training finishes (skipping the NaN updates); evaluating the huge params fails
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 6 and rows[-1]["skipped"] > 0
  config = load_experiment(f"{DIGIT_WORLD}:tiny", list(SHORT) + overrides)
  trainer = Trainer(config, tmp_path)
  try:
    assert all(np.isfinite(leaf).all() for leaf in _leaves(trainer.restore_final_params()))
  finally:
    trainer.close()


def test_inference_loads_the_final_params_without_the_trainer_and_embeds_like_the_model(uninterrupted, tmp_path):
  from crucible_jax import inference
  from crucible_jax.data.registry import make_eval_batches
  workdir, straight, _ = uninterrupted
  before = sorted(p.name for p in workdir.iterdir())
  loaded = inference.load(workdir)
  assert sorted(p.name for p in workdir.iterdir()) == before  # read only
  for a, b in zip(_leaves(straight.restore_final_params()), _leaves(loaded.params)):
    np.testing.assert_array_equal(a, b)
  batch = next(iter(make_eval_batches(loaded.config.data, "val", batch_size=8)))
  reference = straight.experiment.model.apply({"params": loaded.params}, batch, train=False, heads=("embed",),
                                              route=False)["embeddings"]["image"]
  reference = np.asarray(reference) / np.linalg.norm(np.asarray(reference), axis=-1, keepdims=True)
  np.testing.assert_allclose(loaded.embed("image", {"image": batch["image"]}), reference, atol=1e-5)
  with pytest.raises(ValueError, match="no 'nope' encoder"):
    loaded.embed("nope", {"image": batch["image"]})
  out = inference.save_params_dir(tmp_path / "params", loaded.config, loaded.params)
  with pytest.raises(FileExistsError, match="not empty"):
    inference.save_params_dir(out, loaded.config, loaded.params)
  again = inference.load(out)
  np.testing.assert_array_equal(again.embed("text", {"text": batch["text"]}),
                                loaded.embed("text", {"text": batch["text"]}))
  with pytest.raises(FileNotFoundError, match="neither a crucible workdir"):
    inference.load(tmp_path)
