"""Nothing lost, nothing mixed (issue 29): damaged checkpoints, failed saves, a workdir of another config, bad input
files, read-only commands. Each test is one row of the issue's table, on DigitWorld :tiny, one stage of 6 steps."""

import errno
import json
import os
import pathlib
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from crucible_jax import cli
from crucible_jax.config import load_experiment
from crucible_jax.data.digit_world import prepare_digit_world
from crucible_jax.train import checkpoint as checkpoint_lib
from crucible_jax.train.checkpoint import Checkpointer, CheckpointError
from crucible_jax.train.integrity import CHECKSUMMED_MARK, MANIFEST
from crucible_jax.train.loop import Trainer
from crucible_jax.train.workdir import config_diff

EXPERIMENT = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")
SHORT = ["--config.stage_order=('unimodal',)", "--config.stages.unimodal.steps=6", "--config.stages.unimodal.warmup=2",
         "--config.checkpoint.every=2", "--config.checkpoint.keep=2", "--config.log_every=2",
         "--config.eval_splits=('val',)", "--config.checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """A private copy of the tiny dataset: tests damage its files."""
  config = load_experiment(f"{EXPERIMENT}:tiny", [])
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  prepare_digit_world(config.data)
  return pathlib.Path(config.data.data_dir)


def _argv(data_dir: pathlib.Path, *extra: str) -> list[str]:
  return [*SHORT, f"--config.data.data_dir={data_dir}", *extra]


def _config(data_dir: pathlib.Path, *extra: str):
  return load_experiment(f"{EXPERIMENT}:tiny", _argv(data_dir, *extra))


def _train(data_dir, workdir, *extra, trainer_kwargs=None, hook=None):
  trainer = Trainer(_config(data_dir, *extra), workdir, **(trainer_kwargs or {}))
  if hook is not None:
    trainer.add_hook(hook, every=1)
  try:
    return trainer.run()
  finally:
    trainer.close()


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> pathlib.Path:
  """A finished 6-step run with checkpoints 4 and 6 (keep=2)."""
  workdir = tmp_path_factory.mktemp("trained")
  _train(data_dir, workdir)
  return workdir


def _copy(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(trained, tmp_path / "w"))


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


def test_checkpoints_carry_manifests_and_retention_keeps_two(trained):
  steps = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4, 6]
  listed = json.loads((trained / "checkpoints" / "6" / MANIFEST).read_text())["files"]
  assert any(name.startswith("state/") for name in listed) and "meta/metadata" in listed


def test_poisoned_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_good_one(trained, data_dir, tmp_path,
                                                                                       capsys):
  workdir = _copy(trained, tmp_path)
  victim = _largest_file(workdir / "checkpoints" / "6")
  with open(victim, "r+b") as f:  # decodable-sized garbage in the middle: only a checksum can tell
    f.seek(victim.stat().st_size // 2)
    f.write(np.random.default_rng(0).bytes(4096))
  capsys.readouterr()
  results = _train(data_dir, workdir, "--config.log_every=3", trainer_kwargs=dict(allow_config_change=("log_every",)))
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warnings) == 1 and "step 6" in warnings[0] and str(victim.relative_to(workdir / "checkpoints" / "6")) \
      in warnings[0] and "using step 4" in warnings[0], warnings
  assert all(np.isfinite(v) for v in results.values())
  assert (workdir / "checkpoints_rejected" / "6").is_dir()  # set aside, not deleted
  resumed = Checkpointer(workdir, keep=2, read_only=True)
  assert resumed.resume_point()[0] == 6 and resumed.verified_steps() == [6, 4]  # retrained step 6, the good 4 kept
  resumed.close()
  changes = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
  assert changes[-1]["changes"] == {"log_every": {"from": 2, "to": 3}}
  assert json.loads((workdir / "config.json").read_text())["log_every"] == 3


@pytest.mark.parametrize("damage", ["scrambled_metadata", "removed_data_file"])
def test_damaged_checkpoint_falls_back_with_one_line_naming_step_and_file(trained, tmp_path, capsys, damage):
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / "checkpoints" / "6"
  if damage == "scrambled_metadata":
    victim = step_dir / "state" / "_METADATA"
    victim.write_bytes(bytes(b ^ 0x5A for b in victim.read_bytes()))
  else:
    victim = _largest_file(step_dir)
    victim.unlink()
  checkpointer = Checkpointer(workdir, keep=2)
  try:
    step, meta = checkpointer.resume_point()
  finally:
    checkpointer.close()
  assert (step, meta["global_step"]) == (4, 4)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "step 6" in err[0] and str(victim) in err[0], err


def test_no_intact_checkpoint_is_an_error_and_nothing_is_moved(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ("4", "6"):
    (workdir / "checkpoints" / step / "meta" / "metadata").write_text("{}")
  checkpointer = Checkpointer(workdir, keep=2)
  try:
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step 6: .*meta/metadata.*step 4"):
      checkpointer.resume_point()
  finally:
    checkpointer.close()
  assert not (workdir / "checkpoints_rejected").exists()


class _Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs."""


def test_a_first_save_killed_between_commit_and_manifest_is_set_aside_and_the_rerun_starts_afresh(
    trained, data_dir, tmp_path, monkeypatch, capsys):
  def killed(step_dir):
    raise _Killed(step_dir)

  monkeypatch.setattr(checkpoint_lib, "write_manifest", killed)
  with pytest.raises(_Killed):
    _train(data_dir, tmp_path)
  monkeypatch.undo()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", CHECKSUMMED_MARK]  # committed by orbax
  capsys.readouterr()
  results = _train(data_dir, tmp_path)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warnings) == 1 and "starting from scratch: step 2: " in warnings[0] and "its save never completed" \
      in warnings[0], warnings
  reference = json.loads((trained / "results.json").read_text())
  assert {k: v for k, v in results.items() if k != "wall_s"} == {k: v for k, v in reference.items() if k != "wall_s"}
  assert (tmp_path / "checkpoints_rejected" / "2").is_dir()


def test_steps_older_than_manifests_are_accepted_unverified_and_newer_ones_are_not(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  (workdir / "checkpoints" / "6" / MANIFEST).unlink()
  (workdir / "checkpoints" / "4" / MANIFEST).unlink()
  (workdir / "checkpoints" / CHECKSUMMED_MARK).unlink()  # a workdir of the code before manifests
  checkpointer = Checkpointer(workdir, keep=2, read_only=True)
  assert checkpointer.resume_point()[0] == 6
  (workdir / "checkpoints" / CHECKSUMMED_MARK).write_text('{"from_step": 6}')  # resumed by today's code at step 6
  assert checkpointer.resume_point()[0] == 4
  (workdir / "checkpoints" / CHECKSUMMED_MARK).write_text('{"from": 6}')
  with pytest.raises(ValueError, match=f"{CHECKSUMMED_MARK}: unreadable"):
    checkpointer.resume_point()
  checkpointer.close()


def test_non_finite_state_is_never_saved(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
  poisoned = dict(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)},
                  opt_state={"mu": jnp.array([0.0, jnp.inf, 0.0])}, comp_state={}, skipped=jnp.zeros((), jnp.int32),
                  loss_scale=None)
  try:
    with pytest.raises(FloatingPointError, match=r"global step 2 is not finite \(\['opt_state'\]\['mu'\]\)"):
      checkpointer.save(2, types.SimpleNamespace(**poisoned), None, {"global_step": 2})
  finally:
    checkpointer.close()
  assert not list((tmp_path / "checkpoints").iterdir())


def test_failed_background_save_stops_the_run_at_the_next_step_and_keeps_the_last_checkpoint(
    data_dir, tmp_path, monkeypatch):
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full_from_step_4(self, *args, **kwargs):
    if self.get_final().name == "4":
      raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_from_step_4)
  steps = []
  with pytest.raises(CheckpointError) as error:
    _train(data_dir, tmp_path, "--config.checkpoint.async_save=true", hook=lambda info: steps.append(info.global_step))
  message = str(error.value)
  assert f"checkpoint step 4 to {tmp_path.absolute() / 'checkpoints'}: no space left" in message
  assert "needs ~" in message and "MiB free" in message and "step 2, is untouched" in message
  assert max(steps) < 6  # surfaced before the next checkpoint interval
  checkpointer = Checkpointer(tmp_path, keep=2, read_only=True)
  assert checkpointer.resume_point()[0] == 2
  checkpointer.close()
  assert not list((tmp_path / "checkpoints").glob("4*"))  # the partial save's space is given back


@pytest.mark.parametrize("override, key", [("--config.seed=1", "seed: 0 -> 1"),
                                           ("--config.model.joint_dim=48", "model.joint_dim: 32 -> 48")])
def test_rerun_with_another_config_is_refused_before_anything_is_written(trained, data_dir, tmp_path, capsys,
                                                                        override, key):
  workdir = _copy(trained, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  config_json = (workdir / "config.json").read_bytes()
  status = cli.main(["train", "--config", f"{EXPERIMENT}:tiny", "--workdir", str(workdir), *_argv(data_dir, override)])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and err[0].startswith("crucible: config error:") and key in err[0], err
  assert "--allow-config-change=" in err[0]
  assert (workdir / "config.json").read_bytes() == config_json
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_truncated_split_file_is_named_before_the_first_step(data_dir, tmp_path, capsys, split):
  damaged = pathlib.Path(shutil.copytree(data_dir, tmp_path / "data"))
  victim = next(damaged.rglob(f"digit_world-{split}.array_record-*"))
  os.truncate(victim, victim.stat().st_size - 1000)
  workdir = tmp_path / "w"
  status = cli.main(["train", "--config", f"{EXPERIMENT}:tiny", "--workdir", str(workdir), *_argv(damaged)])
  err = capsys.readouterr().err
  assert status == 1 and f"input file {victim}" in err and "Traceback" not in err
  assert not (workdir / "config.json").exists() and not list((workdir / "checkpoints").iterdir())
  assert not (workdir / "metrics.jsonl").read_text()


def test_eval_and_generate_create_nothing_in_a_workdir_without_checkpoint(data_dir, tmp_path, capsys):
  workdir = tmp_path / "nothing_here"
  assert cli.main(["eval", "--config", f"{EXPERIMENT}:tiny", "--workdir", str(workdir), *_argv(data_dir)]) == 1
  assert "no checkpoint" in capsys.readouterr().err and not workdir.exists()
  assert cli.main(["generate", "--config", f"{EXPERIMENT}:tiny,generate", "--workdir", str(workdir),
                   "--from", "text", "--to", "image", "--text", "one two"]) == 1
  assert "no checkpoint" in capsys.readouterr().err and not workdir.exists()


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, bytes(range(7, 250))])
def test_generate_names_an_unreadable_input_before_restoring(tmp_path, capsys, content):
  bad = tmp_path / "bad.png"
  bad.write_bytes(content)
  status = cli.main(["generate", "--config", f"{EXPERIMENT}:tiny,generate", "--workdir", str(tmp_path / "none"),
                     "--from", "image", "--to", "text", "--input", str(bad)])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 1 and len(err) == 1 and f"cannot read input file {bad} as a PNG image" in err[0], err


def test_values_older_runs_derived_into_config_json_are_no_change_but_user_keys_are():
  saved = {"model": {"image": {"dtype": "float32", "width": 32}, "param_dtype": "float32", "routing": {"groups": 8}},
           "seed": 0}
  current = {"model": {"image": {"width": 32}, "routing": {}}, "seed": 0}
  assert config_diff(saved, current) == {}
  assert config_diff(saved, {**current, "seed": 1}) == {"seed": (0, 1)}
  assert config_diff(current, {"model": {"image": {"width": 32, "dtype": "bfloat16"}, "routing": {}}, "seed": 0}) == {
      "model.image.dtype": ("<absent>", "bfloat16")}
