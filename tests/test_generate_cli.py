"""`crucible generate` rejects bad requests with a clear error before loading any model."""

import pathlib

import pytest

from crucible_jax import cli

CONFIG = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py") + ":tiny,generate"


def _generate(tmp_path, *extra):
  return cli.main(["generate", "--config", CONFIG, "--workdir", str(tmp_path), *extra])


def test_unknown_modality_is_rejected(tmp_path, capsys):
  assert _generate(tmp_path, "--from", "smell", "--to", "image", "--text", "one") == 2
  assert "--from 'smell' is not a modality; choose from image, text, audio, video" in capsys.readouterr().err
  assert _generate(tmp_path, "--from", "text", "--to", "video", "--text", "one") == 2
  assert "--to 'video' is not a generation target" in capsys.readouterr().err


def test_missing_input_file_is_rejected(tmp_path, capsys):
  missing = tmp_path / "nowhere.wav"
  assert _generate(tmp_path, "--from", "audio", "--to", "image", "--input", str(missing)) == 1
  assert f"input file not found: {missing}" in capsys.readouterr().err
  assert _generate(tmp_path, "--from", "audio", "--to", "text") == 2
  assert "--from audio needs --input FILE" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--from", "text", "--to", "text", "--text", "one"), "is not a conversion"),
    (("--from", "audio", "--to", "text", "--text", "one"), "--text goes with --from text"),
    (("--from", "image", "--to", "text", "--input", __file__, "--beam", "0"), "--beam must be at least 1"),
])
def test_malformed_requests_are_rejected(tmp_path, capsys, extra, message):
  assert _generate(tmp_path, *extra) == 2
  assert message in capsys.readouterr().err


def test_config_without_converter_is_rejected(tmp_path, capsys):
  plain = CONFIG.replace(":tiny,generate", ":tiny")
  status = cli.main(["generate", "--config", plain, "--workdir", str(tmp_path), "--from", "text", "--to", "image",
                     "--text", "one"])
  assert status == 2 and "model.converter.enabled=False" in capsys.readouterr().err


def test_untrained_workdir_is_reported(tmp_path, capsys):
  assert _generate(tmp_path, "--from", "text", "--to", "image", "--text", "one two") == 1
  assert "no checkpoint" in capsys.readouterr().err
