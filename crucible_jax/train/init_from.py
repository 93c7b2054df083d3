"""`init_from`: start a run from a converted checkpoint's or another run's params, reporting what does not fit.

Config keys: `init_from` (a params directory or a workdir; "" = off), `init_from_take` (regexes over param paths
such as "^encoders_image/"; () = every param) and `init_from_partial` (False: any missing, unexpected or
shape-mismatched key among the taken ones stops the run with the report; True: load what fits, print the report
and write it to WORKDIR/init_from_report.json).
"""

import dataclasses
import json
import pathlib
import re
import sys
from typing import Any, Sequence

import flax.traverse_util
import jax
import orbax.checkpoint as ocp

from crucible_jax.models import lora
from crucible_jax.train.checkpoint import CHECKPOINTS_DIR, PARAMS_DIR, final_state_dir

REPORT_FILE = "init_from_report.json"


class InitFromError(ValueError):
  """The `init_from` source does not fit the model (strict mode) or cannot be read."""


@dataclasses.dataclass
class Report:
  """Param paths loaded, and the ones that did not fit (each list sorted)."""

  source: str
  loaded: list[str]
  missing: list[str]  # the model has it (and `take` selects it), the source does not
  unexpected: list[str]  # the source has it (selected by `take`), the model does not
  mismatched: list[str]  # "path: source shape vs model shape"

  @property
  def fits(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def text(self) -> str:
    lines = [f"init_from {self.source}: {len(self.loaded)} params loaded"]
    for name in ("missing", "unexpected", "mismatched"):
      keys = getattr(self, name)
      if keys:
        lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return "\n".join(lines)


def _locate(source: pathlib.Path) -> tuple[pathlib.Path, bool]:
  """(orbax PyTree directory, whether its params sit under a "params" key) of a params directory or workdir."""
  if (source / PARAMS_DIR).is_dir():
    return (source / PARAMS_DIR).absolute(), False
  try:
    return final_state_dir(source), True
  except FileNotFoundError as e:
    raise InitFromError(f"init_from={str(source)!r} is neither a params directory ({PARAMS_DIR}/) nor a workdir "
                        f"with an intact checkpoint in {CHECKPOINTS_DIR}/") from e


def compare(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], take: Sequence[str],
            source: str) -> Report:
  """What of `saved` (path → shape) fits `wanted`, among the paths some `take` regex selects (all when empty);
  the model's LoRA adapters are never missing."""
  chosen = lambda path: not take or any(re.search(t, path) for t in take)
  src = {k: s for k, s in saved.items() if chosen(k)}
  dst = {k: s for k, s in wanted.items() if chosen(k)}
  common = sorted(set(src) & set(dst))
  # LoRA adapters the source lacks (a converted checkpoint has none) start from their init: B = 0, the base model.
  missing = sorted(k for k in set(dst) - set(src) if not re.search(lora.ADAPTER_PATTERN, k))
  return Report(source, [k for k in common if src[k] == dst[k]], missing,
                sorted(set(src) - set(wanted)), [f"{k}: {src[k]} vs {dst[k]}" for k in common if src[k] != dst[k]])


def apply(config: Any, fresh: Any, shardings: Any, workdir: str | pathlib.Path) -> Any:
  """`fresh` params with every fitting `init_from` param loaded in place, on `shardings`; raises in strict mode."""
  source = pathlib.Path(config.init_from)
  take, partial = tuple(config.get("init_from_take", ())), bool(config.get("init_from_partial", False))
  for pattern in take:
    try:
      re.compile(pattern)
    except re.error as e:
      raise InitFromError(f"init_from_take pattern {pattern!r} is not a regex: {e}") from e
  path, nested = _locate(source)
  metadata = ocp.StandardCheckpointHandler().metadata(path)
  tree = dict(getattr(metadata, "tree", metadata))
  saved = flax.traverse_util.flatten_dict(tree["params"] if nested else tree, sep="/")
  fresh_flat = flax.traverse_util.flatten_dict(fresh, sep="/")
  report = compare({k: tuple(v.shape) for k, v in saved.items()}, {k: tuple(v.shape) for k, v in fresh_flat.items()},
                   take, str(source))
  if take and not (report.loaded or report.mismatched or report.missing):
    raise InitFromError(f"init_from_take {take} selects no param of {source} or of the model")
  if not report.fits and not partial:
    raise InitFromError(report.text() + "\n(init_from_partial=True loads what fits)")
  sharding_flat = flax.traverse_util.flatten_dict(shardings, sep="/")
  target = {k: jax.ShapeDtypeStruct(fresh_flat[k].shape, fresh_flat[k].dtype, sharding=sharding_flat[k])
            for k in report.loaded}
  target = flax.traverse_util.unflatten_dict(target, sep="/")
  target = {"params": target} if nested else target
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  loaded = flax.traverse_util.flatten_dict(restored["params"] if nested else restored, sep="/")
  print(report.text(), file=sys.stderr)
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / REPORT_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=2))
  return flax.traverse_util.unflatten_dict({**fresh_flat, **loaded}, sep="/")
