"""Each stage's train-step program, the later stages' compiled on a background thread while earlier stages train.

XLA compiles a program on one host core, and a training step leaves host cores idle (on a CPU its loop fusions are
single-threaded; on a GPU the host mostly waits), so stage k+1's compile hides behind stage k's steps. `jax.jit`
reuses a program that `.lower(...).compile()` built for the same avals and shardings: the stage's first real call
finds it compiled. Were the avals to differ, that call would compile again — slower, never different.
"""

import concurrent.futures

import jax

from crucible_jax.train import stages as stages_lib
from crucible_jax.train.setup import Experiment, StageProgram


class StagePrograms:
  """Stage programs by plan index: the first built on demand, the rest compiled in order on one background thread."""

  def __init__(self, experiment: Experiment, plans: list[stages_lib.StagePlan], rng: jax.Array):
    self._experiment = experiment
    self._batch = experiment.abstract_batch()
    self._rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=experiment.replicated)  # as made under the mesh
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compile")
    self._futures = {plan.index: self._pool.submit(self._compiled, plan) for plan in plans[1:]}

  def _compiled(self, plan: stages_lib.StagePlan) -> StageProgram:
    program = self._experiment.stage_program(plan)
    with jax.set_mesh(self._experiment.mesh):
      program.train_step.lower(program.abstract, self._batch, self._rng).compile()
    return program

  def get(self, plan: stages_lib.StagePlan) -> StageProgram:
    """The stage's program; waits for its background compile if one is running (re-raising its error)."""
    future = self._futures.pop(plan.index, None)
    return future.result() if future is not None else self._experiment.stage_program(plan)

  def close(self) -> None:
    """Drop compiles not yet started and wait for a running one (a thread cannot be stopped inside XLA)."""
    self._pool.shutdown(wait=True, cancel_futures=True)
