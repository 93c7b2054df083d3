"""A workdir knows its config: a rerun resolves to the saved `config.json`, or names the keys that differ.

Keys the user declares safe to change on resume (`--allow-config-change=eval_splits,log_every`; a key covers its
sub-keys) pass, and each accepted change is appended to `config_changes.jsonl` when the run starts.
"""

import json
import pathlib
import re
import time
from typing import Any

import ml_collections

from crucible_jax.config import ConfigError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
_ABSENT = "<absent>"
# Values Experiment used to write into the caller's config before config.json was compared: present only in
# config.json files of older runs, they are no change of the user's config.
_DERIVED = re.compile(r"^model\.((\w+\.)?dtype|param_dtype|routing\.groups)$")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def _resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, current value)} for every key whose value differs or exists on one side only."""
  old, new = _flat(saved), _flat(current)
  return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in sorted(old.keys() | new.keys())
          if old.get(key, _ABSENT) != new.get(key, _ABSENT) and not (key not in new and _DERIVED.match(key))}


def _covered(key: str, allowed: tuple[str, ...]) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allowed)


def check_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                 allowed: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """The allowed changes against `workdir/config.json` (none when there is no such file); ConfigError names the
  others. Reads only: call before anything is written to the workdir."""
  path = workdir / CONFIG_FILE
  if not path.is_file():
    return {}
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}): cannot tell which config this workdir was trained with") from e
  diff = config_diff(saved, _resolved(config))
  refused = {k: v for k, v in diff.items() if not _covered(k, allowed)}
  if refused:
    changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ConfigError(f"{workdir} holds a run of another config ({changes}); use a new --workdir, or "
                      f"--allow-config-change={','.join(refused)} if these are safe to change on resume")
  return diff


def record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                  changes: dict[str, tuple[Any, Any]]) -> None:
  """Write `config.json` (atomically) and append accepted `changes` to `config_changes.jsonl`."""
  if changes:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": {k: {"from": old, "to": new}
                                                                       for k, (old, new) in changes.items()}}
    with open(workdir / CHANGES_FILE, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  tmp = workdir / f".{CONFIG_FILE}.tmp"
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(workdir / CONFIG_FILE)
