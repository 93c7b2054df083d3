"""The command line a user meets first: override help, the space form, `crucible config`, and config errors that
stop with one line (exit 2) before anything is written."""

import json
import pathlib

import pytest

from crucible_jax import cli

TINY = f"{pathlib.Path(__file__).parent.parent / 'experiments' / 'digit_world.py'}:tiny"


def test_train_help_explains_overrides_and_variants(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for phrase in ("--config.KEY=VALUE", "--config.KEY VALUE", "FILE.py[:ARG]", "crucible config"):
    assert phrase in out


def test_config_prints_the_resolved_config_with_both_override_forms(capsys):
  assert cli.main(["config", "--config", TINY, "--config.batch_size", "64", "--config.stages.align.lr=0.25"]) == 0
  config = json.loads(capsys.readouterr().out)
  assert config["batch_size"] == 64 and config["stages"]["align"]["lr"] == 0.25
  assert config["model"]["text"]["vocab_size"] == 259 and config["data"]["tokenizer"]["kind"] == "byte"


def test_override_without_a_value_is_an_error(capsys):
  assert cli.main(["config", "--config", TINY, "--config.batch_size"]) == 2
  assert "--config.batch_size (no value)" in capsys.readouterr().err


@pytest.mark.parametrize("override, culprit", [
    ("--config.data.variant=noisy", "data.variant='noisy'"),
    ("--config.mesh.tensor=3", "mesh axis"),
    ("--config.stages.align.frozen=('^no_such_param',)", "stages.align.frozen pattern '^no_such_param'"),
    ("--config.compression.method=fp4", "compression.method must be one of"),
    ("--config.compression.target_ratio=0.5", "compression.target_ratio must be a number > 1"),
    ("--config.compression.block=0", "compression.block must be an integer >= 1"),
])
def test_config_errors_are_one_line_and_write_nothing(override, culprit, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", TINY, override, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("crucible: config error: ") and culprit in err and err.count("\n") == 1
  assert not workdir.exists()
