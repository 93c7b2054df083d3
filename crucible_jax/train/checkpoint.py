"""Orbax checkpoints of the train state, the grain iterator and where the run is (stage, step), verified.

Each committed step gets a manifest of its files' checksums (`integrity.py`); a resume takes the newest step that
matches its manifest and sets damaged or unfinished newer ones aside with one warning. A step without a manifest is
unfinished (e.g. killed between orbax's commit and the manifest) unless it predates manifests in its workdir: the
first save writes `checkpoints/crucible_checksummed.json` with its step, and only steps below it (or every step of
a workdir with neither that mark nor any manifest) are accepted unverified. Retention is ours, not orbax's
`max_to_keep`: only a verified step ever pushes an older one out, so the newest good checkpoint survives any number
of failed or damaged saves. A non-finite state is never saved.
"""

import errno
import math
import pathlib
import shutil
import sys
from typing import Any

import flax.traverse_util
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from crucible_jax.train.integrity import (checksummed_from, has_manifest, mark_checksummed, nonfinite_leaves,
                                         tree_bytes, verify, write_manifest)

STATE_FIELDS = ("step", "params", "opt_state", "comp_state", "skipped", "loss_scale")
REJECTED_DIR = "checkpoints_rejected"  # beside `checkpoints/`: damaged steps are moved here, never deleted
CHECKPOINTS_DIR = "checkpoints"  # in a workdir: one orbax step directory per saved global step
PARAMS_DIR = "params"  # in a params directory (converted or saved weights): an orbax PyTree of the model's params
CONFIG_FILE = "config.json"  # in a workdir or params directory: the resolved experiment config
UNFINISHED = "no checksum manifest (its save never completed)"


class CheckpointError(Exception):
  """A checkpoint that cannot be written or read; the message names the step and the file or path."""


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


class Checkpointer:
  """CheckpointManager over `workdir/checkpoints`, keyed by the run's global step; `read_only` creates nothing."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True, read_only: bool = False):
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR
    self.rejected_directory = self.directory.parent / REJECTED_DIR
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoint in {self.directory}: train first")
    self.keep, self.async_save, self.read_only = keep, async_save, read_only
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._primary = jax.process_index() == 0
    self._pending: list[int] = []  # saved, commit not yet confirmed (no manifest yet)
    self._bytes_needed = 0
    self._last_saved = self.manager.latest_step()

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def verified_steps(self) -> list[int]:
    """Steps with a manifest, newest first (their contents are checked on restore, not here)."""
    return sorted((s for s in self.manager.all_steps() if has_manifest(self._step_dir(s))), reverse=True)

  # --- saving --------------------------------------------------------------------------------------

  def save(self, global_step: int, state: Any, iterator: grain.DatasetIterator, meta: dict) -> None:
    """Save (asynchronously when configured) state fields, the iterator position and `meta`; once per step.

    Raises FloatingPointError (nothing written) when the state holds a NaN or inf, and CheckpointError when
    this or the previous background save failed.
    """
    if global_step == self._last_saved:
      return
    self.poll(block=True)
    tree = {name: getattr(state, name) for name in STATE_FIELDS}
    bad = nonfinite_leaves(tree)
    if bad:
      raise FloatingPointError(
          f"the train state at global step {global_step} is not finite ({', '.join(bad[:3])}): not saved; "
          f"{self._newest_note()}")
    self._last_saved = global_step
    self._bytes_needed = tree_bytes(tree)
    if self._primary:
      mark_checksummed(self.directory, global_step)
    try:
      self.manager.save(global_step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          data=grain.checkpoint.CheckpointSave(iterator),
          meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax raises whatever the file system or tensorstore raised
      raise self._save_failed(global_step, e) from e
    self._pending.append(global_step)
    if not self.async_save:
      self.poll(block=True)

  def poll(self, block: bool = False) -> None:
    """Surface a failed background save as CheckpointError; checksum committed saves and apply retention.

    Cheap when nothing is pending or a save is still running (unless `block`): the trainer calls it every step.
    """
    if not self._pending or (not block and self.manager.is_saving_in_progress()):
      return
    step = self._pending[-1]
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._pending.clear()
      raise self._save_failed(step, e) from e
    committed, self._pending = self._pending, []
    if self._primary:
      for done in committed:
        write_manifest(self._step_dir(done))
      self._retire()

  def _retire(self) -> None:
    """Delete every step older than the `keep` newest verified ones; unverified newer steps never count."""
    verified = self.verified_steps()
    if len(verified) < self.keep:
      return
    cutoff = verified[self.keep - 1]
    for step in self.manager.all_steps():
      if step < cutoff:
        shutil.rmtree(self._step_dir(step), ignore_errors=True)
    self.manager.reload()

  def _newest_note(self) -> str:
    verified = self.verified_steps()
    return (f"the newest intact checkpoint, step {verified[0]}, is untouched" if verified
            else "there is no earlier checkpoint")

  def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
    for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):  # free what the failed save took
      shutil.rmtree(partial, ignore_errors=True)
    where = f"could not write checkpoint step {step} to {self.directory}"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
      free = shutil.disk_usage(self.directory).free
      return CheckpointError(f"{where}: no space left on device (it needs ~{self._bytes_needed / 2**20:.1f} MiB, "
                             f"{free / 2**20:.1f} MiB free); {self._newest_note()}")
    return CheckpointError(f"{where}: {_one_line(e)}; {self._newest_note()}")

  # --- restoring -----------------------------------------------------------------------------------

  def resume_point(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest intact checkpoint, None when there is none.

    Damaged or unfinished newer steps are reported in one warning and (unless read-only) moved to
    `checkpoints_rejected/`; when every step is an unfinished save, they are set aside and the run starts afresh
    (None); when no step is intact otherwise, CheckpointError lists them and nothing is moved.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    unverified_below = checksummed_from(self.directory)
    if unverified_below is None:  # no mark: a workdir of older code, legacy only if it has no manifest at all
      unverified_below = 0 if any(has_manifest(self._step_dir(s)) for s in steps) else math.inf
    rejected: list[tuple[int, str]] = []
    for step in steps:
      problem = self._problem(step, unverified_below)
      if problem is None:
        try:
          chosen = (step, self.restore_meta(step))
        except Exception as e:  # a decoder error of any kind: the step is unusable
          problem = f"{self._step_dir(step) / 'meta'}: unreadable ({_one_line(e)})"
        else:
          if rejected:
            self._set_aside(rejected, step)
            self._last_saved = step  # the set-aside steps will be saved again
          return chosen
      rejected.append((step, problem))
    if rejected and all(p.endswith(UNFINISHED) for _, p in rejected):  # only unfinished saves: start afresh
      self._set_aside(rejected, None)
      self._last_saved = None
      return None
    if rejected:
      raise CheckpointError(f"no intact checkpoint in {self.directory}: "
                            + "; ".join(f"step {s}: {p}" for s, p in rejected))
    return None

  def _problem(self, step: int, unverified_below: float) -> str | None:
    step_dir = self._step_dir(step)
    if has_manifest(step_dir):
      return verify(step_dir)
    return None if step < unverified_below else f"{step_dir}: {UNFINISHED}"

  def _set_aside(self, rejected: list[tuple[int, str]], chosen: int | None) -> None:
    moved = ""
    if not self.read_only and self._primary:
      self.rejected_directory.mkdir(exist_ok=True)
      for step, _ in rejected:
        target = self.rejected_directory / str(step)
        suffix = 1
        while target.exists():
          target, suffix = self.rejected_directory / f"{step}.{suffix}", suffix + 1
        shutil.move(str(self._step_dir(step)), target)
      moved = f" (moved to {self.rejected_directory})"
    if not self.read_only:
      self.manager.reload()
    details = "; ".join(f"step {s}: {p}" for s, p in rejected)
    using = "starting from scratch" if chosen is None else f"using step {chosen}"
    print(f"crucible: warning: damaged checkpoint{'s' if len(rejected) > 1 else ''} set aside{moved}, {using}: "
          f"{details}", file=sys.stderr, flush=True)

  def restore_meta(self, global_step: int) -> dict:
    """Where the saved run was (stage, step), read before the state's structure is known."""
    return self.manager.restore(global_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, global_step: int, abstract_state: Any, iterator: grain.DatasetIterator) -> Any:
    """Restore onto the shardings of `abstract_state` (any mesh) and rewind `iterator` in place."""
    target = {name: getattr(abstract_state, name) for name in STATE_FIELDS}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    try:
      restored = self.manager.restore(global_step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:
      raise CheckpointError(f"could not restore checkpoint step {global_step} from {self.directory}: "
                            f"{_one_line(e)}") from e
    return abstract_state.replace(**restored["state"])

  def restore_params(self, global_step: int, abstract_params: Any, iterator: grain.DatasetIterator) -> Any:
    """Only the saved params that the model still has (same path and shape), on `abstract_params`' shardings; what
    is dropped or left to initialisation is printed.

    For a finished stage whose successor changed the model (e.g. added decoders): the next stage's handoff fills
    the params the checkpoint lacks from their initialisation. Rewinds `iterator` in place.
    """
    # Read the state item directly (a partial PyTree restore): registering a PyTree handler for "state" on the
    # manager would make its next StandardSave fail to find a handler.
    path = epath.Path(self.directory / str(global_step) / "state")
    try:
      metadata = ocp.StandardCheckpointHandler().metadata(path)
      saved = flax.traverse_util.flatten_dict(dict(getattr(metadata, "tree", metadata))["params"], sep="/")
      wanted = flax.traverse_util.flatten_dict(abstract_params, sep="/")
      target = {key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for key, x in wanted.items()
                if key in saved and tuple(saved[key].shape) == tuple(x.shape)}
      dropped = sorted(k for k in saved if k not in target)
      fresh = sorted(k for k in wanted if k not in target)
      if dropped or fresh:  # a model that changed between stages: say so, never silently
        print(f"restoring step {global_step}: {len(dropped)} saved params not in this model (or of another shape) "
              f"are dropped {dropped[:8]}; {len(fresh)} model params absent from the checkpoint start from their "
              f"initialisation {fresh[:8]}", file=sys.stderr)
      target = {"params": flax.traverse_util.unflatten_dict(target, sep="/")}
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
      self.manager.restore(global_step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:
      raise CheckpointError(f"could not restore checkpoint step {global_step} from {self.directory}: "
                            f"{_one_line(e)}") from e
    return restored["params"]

  def wait(self) -> None:
    """Block until the pending save is committed and checksummed (CheckpointError if it failed)."""
    self.poll(block=True)

  def close(self) -> None:
    try:
      self.poll(block=True)
    finally:
      self.manager.close()


def final_state_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The `state` item of a workdir's newest intact checkpoint, read only (damaged newer steps are named in a
  warning and skipped); FileNotFoundError when there is none."""
  checkpointer = Checkpointer(workdir, keep=1, async_save=False, read_only=True)
  try:
    resume = checkpointer.resume_point()
  finally:
    checkpointer.close()
  if resume is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first")
  return checkpointer.directory / str(resume[0]) / "state"
