"""The speech probe: the default run's unimodal stage, audio only, scored on the test and held-out speaker splits.

`crucible train --config experiments/digit_world_speech.py[:voices,augment] --workdir W` trains the default audio
tower alone on `pretrain/audio` and writes `test/pretrain/accuracy_audio` and
`test_heldout_speaker/pretrain/accuracy_audio` (exact digit-string accuracy) in about 2 minutes on 2 CPU cores:
a quick read of whether speech learned from the training voices transfers to a speaker it never heard.
Variants are digit_world's `voices` (synthetic eSpeak NG voices) and `augment` (on-device augmentation).
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import digit_world  # noqa: E402  (a sibling experiment file: this is its unimodal stage, audio only)

VARIANTS = ("voices", "augment")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default run's audio tower and unimodal stage; `arg` is a comma list of VARIANTS."""
  variants = tuple(v for v in (arg or "").split(",") if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown digit_world_speech variant(s) {unknown}; known: {VARIANTS}")
  c = digit_world.get_config(",".join(variants))
  c.model.modalities = ("audio",)
  c.stage_order = ("unimodal",)
  c.stages = dict(unimodal=dict(c.stages.unimodal))
  c.stages.unimodal.objective = {"pretrain/audio": 1.0}
  c.evals = dict(pretrain=dict(modalities=("audio",)))
  return c
