"""Orbax checkpoints of the train state, the grain iterator and where the run is (stage, step)."""

import pathlib
import sys
from typing import Any

import flax.traverse_util
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_FIELDS = ("step", "params", "opt_state", "comp_state", "skipped", "loss_scale")


class Checkpointer:
  """CheckpointManager over `workdir/checkpoints`, keyed by the run's global step."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._last_saved = self.manager.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, global_step: int, state: Any, iterator: grain.DatasetIterator, meta: dict) -> None:
    """Save (asynchronously when configured) state fields, the iterator position and `meta`; once per step."""
    if global_step == self._last_saved:
      return
    self._last_saved = global_step
    tree = {name: getattr(state, name) for name in STATE_FIELDS}
    self.manager.save(global_step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, global_step: int) -> dict:
    """Where the saved run was (stage, step), read before the state's structure is known."""
    return self.manager.restore(global_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, global_step: int, abstract_state: Any, iterator: grain.DatasetIterator) -> Any:
    """Restore onto the shardings of `abstract_state` (any mesh) and rewind `iterator` in place."""
    target = {name: getattr(abstract_state, name) for name in STATE_FIELDS}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restored = self.manager.restore(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(iterator)))
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
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    saved = flax.traverse_util.flatten_dict(dict(getattr(metadata, "tree", metadata))["params"], sep="/")
    wanted = flax.traverse_util.flatten_dict(abstract_params, sep="/")
    target = {key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for key, x in wanted.items()
              if key in saved and tuple(saved[key].shape) == tuple(x.shape)}
    dropped = sorted(k for k in saved if k not in target)
    fresh = sorted(k for k in wanted if k not in target)
    if dropped or fresh:  # a model that changed between stages: say so, never silently
      print(f"restoring step {global_step}: {len(dropped)} saved params not in this model (or of another shape) are "
            f"dropped {dropped[:8]}; {len(fresh)} model params absent from the checkpoint start from their "
            f"initialisation {fresh[:8]}", file=sys.stderr)
    target = {"params": flax.traverse_util.unflatten_dict(target, sep="/")}
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(path, args=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    self.manager.restore(global_step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
