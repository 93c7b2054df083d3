"""The task registry: one table of tasks, DigitWorld's registered from data/digit_world, none of it imported by the
generic core (models, train, eval)."""

import ast
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from crucible_jax import tasks
from crucible_jax.config import ConfigError, load_experiment, validate
from crucible_jax.models.crucible import ALL_HEADS
from crucible_jax.train import objectives

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "crucible_jax"
DIGIT_WORLD = "crucible_jax.data.digit_world"
GENERIC = ("models", "train", "eval", "tasks")
GENERIC_DATA = ("loader", "registry", "verify", "schema", "benchmarks")  # data modules every source shares


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at any depth of the file (function-level imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


def _generic_files() -> list[pathlib.Path]:
  return ([path for package in GENERIC for path in sorted((PACKAGE / package).rglob("*.py"))]
          + [PACKAGE / "data" / f"{name}.py" for name in GENERIC_DATA] + [PACKAGE / "inference.py"])


def test_no_generic_module_imports_digit_world():
  offenders = {str(path.relative_to(ROOT)): sorted(m for m in _imports(path) if m.startswith(DIGIT_WORLD))
               for path in _generic_files()}
  assert {path: mods for path, mods in offenders.items() if mods} == {}
  assert _imports(PACKAGE / "data" / "digit_world" / "pipeline.py") & {DIGIT_WORLD + ".validation"}  # scan works


def test_no_module_imports_another_modules_private_names():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crucible_jax"):
        offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
  assert offenders == []


def test_no_generic_module_mentions_digit_words():
  words = re.compile(r"\b(DIGIT_WORDS|WORD_SLOT|caption_text|seven|eight)\b")
  mentions = {str(path.relative_to(ROOT)): words.findall(path.read_text()) for path in _generic_files()}
  assert {path: found for path, found in mentions.items() if found} == {}


def test_importing_the_generic_core_loads_no_digit_world_module():
  code = ("import sys, crucible_jax.models, crucible_jax.tasks, crucible_jax.train.objectives, "
          "crucible_jax.eval.evaluators, crucible_jax.train.loop, crucible_jax.train.evaluate, crucible_jax.inference; "
          "print(sorted(m for m in sys.modules if m.startswith('crucible_jax.data.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
  assert DIGIT_WORLD not in out, out
  assert "crucible_jax.data.tokenizers" in out and "crucible_jax.data.loader" in out  # the probe lists what it loaded


def test_every_task_names_a_model_head_and_evaluator_kinds_are_unique():
  load_experiment(f"{ROOT / 'experiments' / 'digit_world.py'}:tiny")  # validation registers DigitWorld's tasks
  assert {"contrastive", "vqa", "tagging", "asr", "caption", "imagine", "pretrain", "fused"} <= set(tasks.names())
  kinds = [k for name in tasks.names() for k in tasks.get(name).evaluators]
  assert len(kinds) == len(set(kinds))
  for name in tasks.names():
    assert tasks.get(name).head in ALL_HEADS, name
  assert tasks.get("pretrain").source == tasks.get("fused").source == "digit_world"
  assert tasks.source_extras("digit_world").question_types and tasks.source_extras("own").question_types == ()


def test_term_modalities_come_from_the_table():
  assert tasks.term_modalities("contrastive/audio-text") == {"audio", "text"}
  assert tasks.term_modalities("vqa") == {"image", "text"}
  assert tasks.term_modalities("caption/video") == {"video"}
  with pytest.raises(ValueError, match="smell"):
    tasks.term_modalities("contrastive/image-smell")
  with pytest.raises(ValueError, match="takes no"):
    tasks.term_modalities("asr/audio")
  with pytest.raises(ValueError, match="unknown task 'captioning'"):
    tasks.term_modalities("captioning/image")


def test_a_registered_task_trains_and_evaluates_by_name():
  """The path a user's own task takes: register once, then name it in an objective and in config.evals."""
  def term(arg, key, ctx):
    return lambda outputs, batch: (jnp.mean(outputs["tag_logits"] ** 2), {})

  class Count:
    heads = ("tagging",)

    def __init__(self, scale: float = 1.0):
      self.scale, self.rows = scale, 0

    def update(self, outputs, batch):
      self.rows += len(outputs["tag_logits"])

    def result(self):
      return {"quiet/rows": self.rows * self.scale}

  tasks.register(tasks.Task("quiet", head="tagging", outputs=("tag_logits",),
                            modalities=tasks.fixed("quiet", ("audio",)), term=term, evaluators={"quiet_rows": Count}))
  heads, objective = objectives.build_objective({"quiet": 2.0})
  loss, metrics = objective({"tag_logits": jnp.full((3, 4), 2.0)}, {})
  assert heads == ("tagging",) and float(loss) == 8.0 and float(metrics["loss/quiet"]) == 4.0
  evaluator = tasks.build_evaluators(ml_collections.ConfigDict({"mine": {"kind": "quiet_rows", "scale": 0.5}}))["mine"]
  evaluator.update({"tag_logits": jnp.zeros((6, 4))}, {})
  assert evaluator.result() == {"quiet/rows": 3.0}
  with pytest.raises(ValueError, match="already registered by task 'quiet'"):
    tasks.register(tasks.Task("loud", head="tagging", outputs=(), modalities=tasks.fixed("loud", ()),
                              evaluators={"quiet_rows": Count}))


def test_a_digit_world_task_on_another_source_is_a_config_error():
  load_experiment(f"{ROOT / 'experiments' / 'digit_world.py'}:tiny")  # DigitWorld's tasks are registered now
  with pytest.raises(ConfigError, match="objective.fused: task 'fused' belongs to data.name='digit_world'"):
    load_experiment(str(ROOT / "experiments" / "audioset.py"), ["stages.joint.objective={'fused': 1.0}"])


def test_the_caption_task_checks_its_batch_targets_at_config_load():
  """Captioning reads batch['caption']: data.caption_len must give it, no longer than the decoder's max_len."""
  spec = f"{ROOT / 'experiments' / 'digit_world.py'}:tiny,generate"
  with pytest.raises(ConfigError, match="caption/.*data.caption_len=0 leaves out"):
    load_experiment(spec, ["data.caption_len=0"])
  with pytest.raises(ConfigError, match="data.caption_len=30 exceeds model.converter.max_len=24"):
    load_experiment(spec, ["data.caption_len=30"])
  unrendered = load_experiment(spec).to_dict()  # a source (or an older config) with no caption in its batches
  del unrendered["data"]["caption_len"]
  with pytest.raises(ConfigError, match="data.name='digit_world' does not render"):
    validate(ml_collections.ConfigDict(unrendered))
