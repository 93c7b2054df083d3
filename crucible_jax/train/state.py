"""The train state: one pytree that the step maps to the next and the checkpointer saves."""

from typing import Any

import flax.struct
import jax
import optax

from crucible_jax.parallel.precision import DynamicLossScale


@flax.struct.dataclass
class TrainState:
  """Params, optimizer state and bookkeeping; every field is a jax pytree so jit can donate it."""

  step: jax.Array  # optimizer steps taken in the current stage
  params: Any  # model parameters (unboxed)
  opt_state: optax.OptState  # optimizer state of the current stage
  comp_state: Any  # gradient-compression error feedback (empty dict when uncompressed)
  skipped: jax.Array  # updates skipped because the loss or a gradient was not finite (incl. f16 overflows)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  loss_scale: DynamicLossScale | None = None  # dynamic loss scale of float16 compute; None = no scaling

  def apply_gradients(self, grads: Any) -> "TrainState":
    """One optimizer update."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)
