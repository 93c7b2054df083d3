"""The `crucible` command line: help, prepare, config errors, train → results.json → eval, the console script."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from crucible_jax import cli
from crucible_jax.data import registry
from crucible_jax.train import checkpoint

ROOT = pathlib.Path(__file__).parent.parent
TINY = f"{ROOT / 'experiments' / 'digit_world.py'}:tiny"
# One short stage. The unimodal stage and the evals match experiments/quickstart.ipynb's, so the notebook test
# reuses these compilations from the session's persistent cache.
SHORT = ["--config.stage_order=('unimodal',)", "--config.stages.unimodal.steps=10",
         "--config.stages.unimodal.warmup=2", "--config.log_every=5", "--config.checkpoint.every=10",
         "--config.eval_splits=('test',)"]
METRIC_KEY = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+$")  # split/task/metric


def test_help_lists_every_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for command in ("train", "eval", "bench", "prepare"):
    assert command in out


def test_console_script_runs():
  script = pathlib.Path(sys.executable).parent / "crucible"
  assert script.exists(), f"console script not installed next to {sys.executable}: pip install -e ."
  done = subprocess.run([str(script), "bench", "--help"], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert all(kind in done.stdout for kind in cli.BENCH_KINDS)


def _dataset_files(root: pathlib.Path) -> dict[str, float]:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prepare_builds_then_is_idempotent(tmp_path, capsys):
  argv = ["prepare", "digit_world", "--data-dir", str(tmp_path), "--config", TINY]
  assert cli.main(argv) == 0
  assert "prepared digit_world" in capsys.readouterr().out
  built = _dataset_files(tmp_path)
  assert any(".array_record" in name for name in built), sorted(built)
  assert cli.main(argv) == 0
  assert _dataset_files(tmp_path) == built  # nothing rewritten the second time


@pytest.mark.parametrize("override, culprit", [
    ("--config.stages.unimodal.stepz=3", "stages.unimodal.stepz"),
    ("--config.batch_size=many", "batch_size"),
])
def test_bad_override_exits_2_naming_the_key(override, culprit, tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), override]) == 2
  err = capsys.readouterr().err
  assert culprit in err and "config error" in err
  assert not (tmp_path / "results.json").exists()


def test_unknown_argument_exits_2(tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--bogus-flag"]) == 2
  assert "--bogus-flag" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:  # a required argument missing is argparse's exit 2
    cli.main(["train", "--config", TINY])
  assert exit_info.value.code == 2


def test_unknown_bench_kind_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["bench", "nope", "--config", TINY, "--json", "/dev/null"])
  assert exit_info.value.code == 2
  assert "nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One short `crucible train` run: (workdir, results.json contents)."""
  workdir = tmp_path_factory.mktemp("cli_train")
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SHORT]) == 0
  return workdir, json.loads((workdir / "results.json").read_text())


def test_train_writes_results_contract(trained):
  workdir, results = trained
  assert results["steps"] == 10
  assert results["wall_s"] > 0
  metrics = {k: v for k, v in results.items() if k not in ("wall_s", "steps")}
  bad = [k for k in metrics if not METRIC_KEY.match(k)]
  assert not bad, f"keys not of the form split/task/metric: {bad}"
  assert {k.split("/")[0] for k in metrics} == {"test"}
  for key in ("test/image_to_text/R@1", "test/vqa/accuracy", "test/asr/wer"):
    assert key in metrics, key
  assert all(isinstance(v, float) for v in metrics.values())
  assert (workdir / "metrics.jsonl").exists() and (workdir / "plots" / "retrieval_examples.png").exists()


def test_eval_prints_the_trained_metrics_from_params_alone(trained, capsys, tmp_path, monkeypatch):
  """Eval reads the checkpoint's params only: no train iterator, optimizer state, metrics or TensorBoard files."""
  trained_dir, results = trained
  workdir = pathlib.Path(shutil.copytree(trained_dir, tmp_path / "w", ignore=shutil.ignore_patterns(
      "metrics.jsonl", "tensorboard", "plots", "crucible.log")))
  (workdir / "metrics.jsonl").mkdir()  # opening either would fail, even as root
  (workdir / "tensorboard").write_text("not a directory")
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}

  def refuse(*args, **kwargs):
    raise AssertionError("crucible eval must not build a train iterator or restore a train state")

  monkeypatch.setattr(registry, "make_train_iterator", refuse)
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", refuse)
  capsys.readouterr()
  assert cli.main(["eval", "--config", TINY, "--workdir", str(workdir), *SHORT]) == 0
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
  out = capsys.readouterr().out
  printed = json.loads(out[out.index("{"):])
  expected = {k: v for k, v in results.items() if k not in ("wall_s", "steps")}
  assert printed.keys() == expected.keys()
  for key, value in expected.items():
    assert printed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_eval_on_empty_workdir_fails_clearly(tmp_path, capsys):
  assert cli.main(["eval", "--config", TINY, "--workdir", str(tmp_path), *SHORT]) != 0
  err = capsys.readouterr().err
  assert "no checkpoint" in err and "train first" in err
