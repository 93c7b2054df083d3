"""Experiment files → validated `ml_collections.ConfigDict`.

An experiment is a Python file with `get_config(arg: str | None) -> ConfigDict` (big_vision convention);
`path.py:arg` selects a variant and `a.b=value` overrides any existing field. An experiment may also define
`resolve(config)`, run after the overrides, for fields that follow from them (e.g. the modalities own data has).
`model.text.vocab_size` follows `data.tokenizer`. Validation runs before anything compiles and names the
offending key.
"""

import ast
import importlib.util
import math
import pathlib
import types
from typing import Any, Iterable

import ml_collections

from crucible_jax import tasks
from crucible_jax.common_types import MODALITIES
from crucible_jax.data import registry
from crucible_jax.data.tokenizers import tokenizer_of
from crucible_jax.models.lora import run_adapters
from crucible_jax.parallel import compression, precision

STAGE_NAMES = ("unimodal", "align", "joint")
NAN_POLICIES = ("skip", "abort")


class ConfigError(ValueError):
  """A config that cannot run; the message names the key."""


def load_experiment_module(path: str | pathlib.Path) -> types.ModuleType:
  """The experiment file at `path`, imported by path (experiments/ is not a package)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"experiment file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"crucible_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_experiment(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Load `path.py[:arg]`, apply `key=value` overrides, validate, and return the locked config."""
  path_str, _, arg = spec.partition(":")
  path = pathlib.Path(path_str)
  module = load_experiment_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg)")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:  # e.g. an unknown variant after ':'
    raise ConfigError(f"{path}:{arg}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(config)}")
  for item in overrides:
    apply_override(config, item)
  if hasattr(module, "resolve"):
    try:
      module.resolve(config)
    except ValueError as e:  # e.g. own data that cannot be read
      raise ConfigError(f"{path}: {e}") from e
  resolve_tokenizer(config)
  validate(config)
  config.lock()
  return config


def resolve_tokenizer(config: ml_collections.ConfigDict) -> None:
  """Raise `model.text.vocab_size` to `data.tokenizer`'s vocabulary when smaller (a larger, e.g. padded, table is
  kept); ConfigError naming the field if the tokenizer cannot load."""
  if "tokenizer" not in config.get("data", {}) or "text" not in config.get("model", {}):
    return
  try:
    vocab_size = tokenizer_of(config.data).vocab_size
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.tokenizer: {e}") from e
  config.model.text.vocab_size = max(int(config.model.text.vocab_size), vocab_size)


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Apply one `a.b.c=value`; the value is parsed to the existing field's type."""
  key, sep, raw = item.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  if not sep or not key:
    raise ConfigError(f"override {item!r} is not of the form key=value")
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {item!r})")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown config key {key!r} (in override {item!r})")
  node[leaf] = _parse_like(node[leaf], raw, key)


def _parse_like(current: Any, raw: str, key: str) -> Any:
  """Parse `raw` to the type of `current` (bool/int/float/str/tuple/None)."""
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} wants a bool, got {raw!r}")
  if isinstance(current, str) or current is None:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
    return value if current is None else raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config key {key!r} wants {type(current).__name__}, got {raw!r}") from e
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(current)(value)
  if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
    return ml_collections.ConfigDict(value)
  if type(value) is not type(current):
    raise ConfigError(f"config key {key!r} wants {type(current).__name__}, got {raw!r}")
  return value


def _require(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  for key in keys:
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"config lacks required key {key!r}")
      node = node[part]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the key for anything that would fail later (or silently do the wrong thing)."""
  _require(config, ("seed", "batch_size", "data", "model", "mesh", "sharding.layout", "stages", "stage_order",
                    "evals", "checkpoint.every", "checkpoint.keep", "log_every", "nan_policy", "loss_kind"))
  if config.batch_size <= 0:
    raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
  if config.nan_policy not in NAN_POLICIES:
    raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  if config.loss_kind not in tasks.LOSS_KINDS:
    raise ConfigError(f"loss_kind must be one of {tasks.LOSS_KINDS}, got {config.loss_kind!r}")
  try:  # first: the source registers its own tasks, which the stages and evals may name
    registry.register_tasks(config.data.name)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  converter = config.model.get("converter")
  if (converter is not None and converter.get("enabled", False) and converter.get("image_target") == "reference"
      and tasks.source_extras(config.data.name).reference_glyphs is None):
    raise ConfigError(f"model.converter.image_target='reference' draws the source's reference glyphs; data.name="
                      f"{config.data.get('name')!r} registers none (use 'sample')")
  _validate_mesh(config)
  _validate_compression(config)
  _validate_modalities(config)
  _validate_stages(config)
  tokenizer = config.data.get("tokenizer", {}).get("kind", "byte")
  if tokenizer == "clip_bpe" and "text" in config.model.modalities and config.model.text.get("mask") == "padding":
    raise ConfigError("data.tokenizer.kind='clip_bpe' gives id 0 to the token '!', which model.text.mask='padding' "
                      "would hide; use 'causal' (CLIP's own mask)")
  if converter is not None and converter.get("enabled", False) and tokenizer != "byte":
    raise ConfigError(f"model.converter captions in byte tokens; data.tokenizer.kind={tokenizer!r} (use 'byte')")
  try:
    registry.validate(config.data)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
  sizes = dict(config.mesh)
  unknown = sorted(set(sizes) - {"data", "fsdp", "tensor"})
  if unknown:
    raise ConfigError(f"mesh has unknown axes {unknown}; known: data, fsdp, tensor")
  if sum(1 for v in sizes.values() if v == -1) > 1:
    raise ConfigError(f"mesh may fill at most one axis with -1, got {sizes}")
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{name} must be positive or -1, got {size}")
  fixed = math.prod(v for v in sizes.values() if v > 0)
  batch_axes = [sizes.get("data", 1), sizes.get("fsdp", 1)]
  if -1 not in batch_axes and config.batch_size % math.prod(batch_axes):
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by mesh data×fsdp={math.prod(batch_axes)}")
  if fixed <= 0:
    raise ConfigError(f"mesh sizes must be positive, got {sizes}")


def _validate_compression(config: ml_collections.ConfigDict) -> None:
  comp = {**compression.default_compression_config(), **dict(config.get("compression", {}))}
  unknown = sorted(set(comp) - set(compression.default_compression_config()))
  if unknown:
    raise ConfigError(f"compression has unknown keys {unknown}; known: {sorted(compression.default_compression_config())}")
  if comp["method"] not in compression.METHODS:
    raise ConfigError(f"compression.method must be one of {compression.METHODS}, got {comp['method']!r}")
  for key in ("rank", "block"):
    value = comp[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"compression.{key} must be an integer >= 1, got {value!r}")
  ratio = comp["target_ratio"]
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1:
    raise ConfigError(f"compression.target_ratio must be a number > 1, got {ratio!r}")


def _validate_modalities(config: ml_collections.ConfigDict) -> None:
  active = tuple(config.model.modalities)
  for m in active:
    if m not in MODALITIES:
      raise ConfigError(f"model.modalities has unknown modality {m!r}; known: {MODALITIES}")
  data, model = config.data, config.model
  checks = {
      "image": [("data.image_size", tuple(data.image_size), "model.image.size", tuple(model.image.size))],
      "video": [("data.video_frames", data.video_frames, "model.video.frames", model.video.frames),
                ("data.video_size", tuple(data.video_size), "model.video.size", tuple(model.video.size))],
      "audio": [("data.sample_rate", data.sample_rate, "model.audio.sample_rate", model.audio.sample_rate),
                ("data.audio_seconds", data.audio_seconds, "model.audio.seconds", model.audio.seconds)],
      "text": [("data.text_len", data.text_len, "model.text.max_len", model.text.max_len)],
  }
  for m in active:
    for data_key, data_value, model_key, model_value in checks[m]:
      if data_value != model_value:
        raise ConfigError(f"{data_key}={data_value} disagrees with {model_key}={model_value}")


def _term_modalities(config: ml_collections.ConfigDict, where: str, term: str) -> set[str]:
  """The modalities objective term `term` needs; ConfigError for an unknown task or another source's task."""
  try:
    task, _ = tasks.task_of_term(term)
    needed = set(tasks.term_modalities(term))
  except ValueError as e:
    raise ConfigError(f"{where}: {e}") from None
  _check_task(config, where, task)
  return needed


def _check_task(config: ml_collections.ConfigDict, where: str, task: tasks.Task) -> None:
  """ConfigError when `task` is another source's or its own check (`Task.validate`) refuses the config."""
  if task.source is not None and task.source != config.data.name:
    raise ConfigError(f"{where}: task {task.name!r} belongs to data.name={task.source!r}, not {config.data.name!r}")
  if task.validate is not None:
    try:
      task.validate(config)
    except ValueError as e:
      raise ConfigError(f"{where}: {e}") from None


def _validate_accum_steps(config: ml_collections.ConfigDict, name: str) -> None:
  """`stages.<name>.accum_steps`: GradCache chunks, an int >= 1 that divides every device's rows, uncompressed,
  without float16 loss scaling."""
  k = config.stages[name].get("accum_steps", 1)
  where = f"stages.{name}.accum_steps={k!r}"
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"{where} must be an integer >= 1")
  if k == 1:
    return
  method = config.get("compression", {}).get("method", "none")
  if method != "none":
    raise ConfigError(f"{where} cannot be combined with compression.method={method!r}")
  try:
    float16 = precision.Policy.from_config(config.get("precision", {})).needs_loss_scaling
  except ValueError as e:
    raise ConfigError(f"precision: {e}") from None
  if float16:
    raise ConfigError(f"{where} cannot be combined with float16 compute (its loss scaling); use bfloat16")
  shards = math.prod(v for axis, v in dict(config.mesh).items() if axis in ("data", "fsdp"))
  if shards > 0 and (config.batch_size // shards) % k:
    raise ConfigError(f"{where} does not divide the {config.batch_size // shards} rows per device "
                      f"(batch_size={config.batch_size} over mesh data x fsdp={shards})")


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  active = set(config.model.modalities)
  if not config.stage_order:
    raise ConfigError("stage_order is empty: nothing to train")
  for name in config.stage_order:
    if name not in config.stages:
      raise ConfigError(f"stage_order names {name!r}, which is not in stages ({list(config.stages)})")
    stage = config.stages[name]
    _require(stage, ("steps", "lr", "warmup", "objective", "frozen"))
    if stage.steps < 0 or stage.lr < 0 or stage.warmup < 0:
      raise ConfigError(f"stages.{name}: steps, lr and warmup must be ≥ 0")
    if stage.warmup > stage.steps:
      raise ConfigError(f"stages.{name}.warmup={stage.warmup} exceeds steps={stage.steps}")
    route = stage.get("route", True)
    if not isinstance(route, bool):
      raise ConfigError(f"stages.{name}.route={route!r} must be true or false")
    planned = sorted(t for t in stage.objective if t in ("routing/budget", "routing/balance"))
    if not route and planned:
      raise ConfigError(f"stages.{name}.route=False bypasses the router's plan, but its objective has the plan's "
                        f"terms {planned} (only routing/utility, which trains the estimator, applies)")
    _validate_accum_steps(config, name)
    for term in stage.objective:
      if term.startswith("routing/"):
        continue  # the router's terms (train/objectives.py) need no modality
      missing = _term_modalities(config, f"stages.{name}.objective.{term}", term) - active
      if missing:
        raise ConfigError(f"stages.{name}.objective.{term} needs modalities {sorted(missing)} "
                          f"not in model.modalities {sorted(active)}")
  try:
    adapters = run_adapters(config.stages, config.stage_order)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  missing = sorted(set(adapters) - active)
  if missing:
    raise ConfigError(f"stages' lora.towers name {missing}, not in model.modalities {sorted(active)}")
  for name, evaluator in config.evals.items():
    try:
      task = tasks.evaluator_task(evaluator.get("kind", name))
    except ValueError as e:
      raise ConfigError(f"evals.{name}: {e}") from None
    _check_task(config, f"evals.{name}", task)
    for pair in evaluator.get("pairs", ()):
      missing = set(pair) - active
      if missing:
        raise ConfigError(f"evals.{name}.pairs has {tuple(pair)}: modalities {sorted(missing)} not in the model")
