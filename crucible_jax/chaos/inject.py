"""Run the `crucible` command line with one fault injected into this process (the campaign's child processes).

  python -m crucible_jax.chaos.inject KIND@STEP [--seed S] -- train --config ... --workdir ...

KIND: `enospc` (the save of global step STEP fails with ENOSPC in orbax's commit, as a full disk would), `nan_batch`
(the input batch of global step STEP is NaN), `inf_grad` (the gradient of global step STEP is inf while its loss
stays finite; `--seed` must be the run's config.seed; not under float16 loss scaling). Faults are patched in from
outside, so the library's own step holds no fault code.
"""

import argparse
import errno
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("enospc", "nan_batch", "inf_grad")


def parse(spec: str) -> tuple[str, int]:
  """`KIND@STEP` → (kind, global step); ValueError names a malformed spec."""
  kind, _, step = spec.partition("@")
  if kind not in KINDS or not step.isdigit() or int(step) < 1:
    raise ValueError(f"fault {spec!r}: expected KIND@GLOBAL_STEP, KIND one of {KINDS}, step ≥ 1")
  return kind, int(step)


def _enospc_at(step: int) -> None:
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == str(step):
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _nan_batch_at(step: int) -> None:
  from crucible_jax.data import loader
  original, calls = loader.to_global_batch, [0]

  def to_global_batch(local_batch, sharding):
    calls[0] += 1  # the trainer assembles one batch per step, in order, before any evaluation batch
    if calls[0] == step:
      local_batch = {k: np.full_like(v, np.nan) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
                     for k, v in local_batch.items()}
      print(f"crucible: injected: NaN input batch at global step {step}", file=sys.stderr, flush=True)
    return original(local_batch, sharding)

  loader.to_global_batch = to_global_batch


def _inf_grad_at(step: int, seed: int) -> None:
  from crucible_jax.train import step as step_lib
  original = step_lib.make_train_step

  def make_train_step(loss_fn: Callable, *, grad_fn: Callable | None = None):
    def plain(params, batch, comp_state, rng):
      return (*jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng), comp_state)

    reduce = grad_fn or plain

    def poisoned(params, batch, comp_state, rng):
      # The trainer's step key is fold_in(key(seed), global step - 1): it tells the traced step which step it is.
      target = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), step - 1))
      scale = jnp.where(jnp.all(jax.random.key_data(rng) == target), jnp.inf, 1.0)
      aux, grads, comp_state = reduce(params, batch, comp_state, rng)
      return aux, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), comp_state

    return original(loss_fn, grad_fn=poisoned)

  step_lib.make_train_step = make_train_step


def install(spec: str, seed: int = 0) -> None:
  """Patch the fault `spec` into this process."""
  kind, step = parse(spec)
  if kind == "enospc":
    _enospc_at(step)
  elif kind == "nan_batch":
    _nan_batch_at(step)
  else:
    _inf_grad_at(step, seed)


def main(argv: list[str]) -> int:
  own, crucible = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  parser = argparse.ArgumentParser(prog="python -m crucible_jax.chaos.inject", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("fault", help="KIND@GLOBAL_STEP")
  parser.add_argument("--seed", type=int, default=0, help="the run's config.seed (inf_grad)")
  args = parser.parse_args(own)
  if not crucible:
    parser.error("give the crucible command line after --")
  install(args.fault, args.seed)
  from crucible_jax import cli
  return cli.main(crucible)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
