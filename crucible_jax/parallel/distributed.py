"""Process-level setup and agreement: joining a multi-process JAX job, XLA flags for overlapped communication,
agreeing on a stop, and the fault-injection hook the failure tests drive.

Joining and the flags must come before the first JAX computation (i.e. before the backend initialises).
"""

import logging
import os
import signal
import sys
from typing import Mapping, MutableMapping

import jax
import numpy as np
from jax.experimental import multihost_utils

# A peer that has not joined within INIT_TIMEOUT_S, or stops heartbeating for HEARTBEAT_TIMEOUT_S, fails the job
# instead of hanging it.
INIT_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 100

# `CRUCIBLE_FAULT=PROCESS:POINT` makes process PROCESS exit abruptly (os._exit(FAULT_EXIT)) on reaching POINT.
# `CRUCIBLE_FAULT=PROCESS:POINT@STEP` fires only at that global step and freezes the process instead (SIGSTOP: every
# thread stops where it is, a background save mid-write included), for a supervisor to `kill -9` it at that point.
FAULT_ENV = "CRUCIBLE_FAULT"
# start of evaluation; right after a checkpoint save was started; right after a step's update (before its hooks)
FAULT_POINTS = ("eval", "save", "step")
FAULT_EXIT = 13

# Bytes up to which XLA merges small collectives into one (fewer launches; big enough to hide latency).
COMBINE_THRESHOLD_BYTES = 128 * 1024 * 1024


def _env_int(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env[key])
  except KeyError:
    raise ValueError(f"{key} must be set together with JAX_COORDINATOR_ADDRESS") from None
  except ValueError:
    raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _slurm_tasks(env: Mapping[str, str]) -> int:
  value = env.get("SLURM_NTASKS", "1")
  if not value.strip().isdigit():
    raise ValueError(f"SLURM_NTASKS={value!r} is not an integer")
  return int(value)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] = os.environ,
    initialization_timeout: int = INIT_TIMEOUT_S,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
) -> bool:
  """Join the multi-process job if one is configured; False (and nothing done) on a single process.

  Sources, first match wins: explicit arguments; env JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
  JAX_PROCESS_ID; SLURM with SLURM_NTASKS > 1 (jax's own cluster detection reads it).
  """
  timeouts = dict(initialization_timeout=initialization_timeout, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  explicit = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in explicit.values()):
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(f"initialize_distributed: {missing} missing; give coordinator, num_processes and process_id")
  elif env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = _env_int(env, "JAX_NUM_PROCESSES")
    process_id = _env_int(env, "JAX_PROCESS_ID")
  elif _slurm_tasks(env) > 1:
    logging.info("joining SLURM job of %s tasks", env["SLURM_NTASKS"])
    jax.distributed.initialize(**timeouts)
    return True
  else:
    return False
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
  logging.info("joining %s as process %d of %d", coordinator, process_id, num_processes)
  jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
  return True


def overlap_xla_flags(enable: bool) -> list[str]:
  """XLA GPU flags that overlap collectives with compute (enable) or serialise them (not enable)."""
  if not enable:
    return ["--xla_gpu_enable_latency_hiding_scheduler=false"]
  return [
      "--xla_gpu_enable_latency_hiding_scheduler=true",  # schedules async collectives around independent compute
      "--xla_gpu_enable_highest_priority_async_stream=true",  # collectives are not starved by compute kernels
      "--xla_gpu_enable_pipelined_all_gather=true",  # FSDP: gather the next layer's params while computing
      "--xla_gpu_enable_pipelined_reduce_scatter=true",
      "--xla_gpu_enable_pipelined_all_reduce=true",
      f"--xla_gpu_all_reduce_combine_threshold_bytes={COMBINE_THRESHOLD_BYTES}",
      f"--xla_gpu_all_gather_combine_threshold_bytes={COMBINE_THRESHOLD_BYTES}",
      f"--xla_gpu_reduce_scatter_combine_threshold_bytes={COMBINE_THRESHOLD_BYTES}",
  ]


def _backend_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # no public way to ask; the check is advisory only
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


# XLA:CPU warns after 20 s and aborts the process after 40 more when one simulated device reaches a collective that
# late (a starved thread on a loaded host). Read from XLA_FLAGS only: the same fields given as compile options have
# no effect at run time. Benchmarks and chaos children wait instead.
CPU_COLLECTIVE_PATIENCE = ["--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
                           "--xla_cpu_collective_call_terminate_timeout_seconds=1800"]


def apply_xla_flags(flags: list[str], env: MutableMapping[str, str] = os.environ) -> str:
  """Append `flags` to env XLA_FLAGS (later flags win in XLA) and return the new value."""
  if env is os.environ and _backend_initialized():
    raise RuntimeError("XLA flags must be set before the first JAX computation; the backend is already up")
  current = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(current + [f for f in flags if f not in current])
  return env["XLA_FLAGS"]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any one; a collective, so every process must call it."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def fault_point(point: str, step: int | None = None, env: Mapping[str, str] = os.environ) -> None:
  """Exit (or, for a `@STEP` spec, freeze) this process when `CRUCIBLE_FAULT` names it, `point` and `step`."""
  spec = env.get(FAULT_ENV)
  if not spec:
    return
  process, _, target = spec.partition(":")
  target, at, at_step = target.partition("@")
  if not process.isdigit() or target not in FAULT_POINTS or (at and not at_step.isdigit()):
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected PROCESS:POINT[@GLOBAL_STEP], POINT one of {FAULT_POINTS}")
  if int(process) != jax.process_index() or target != point or (at and int(at_step) != step):
    return
  if not at:
    print(f"crucible: {FAULT_ENV}: process {process} exits at {point!r}", file=sys.stderr, flush=True)
    os._exit(FAULT_EXIT)
  print(f"crucible: {FAULT_ENV}: process {process} freezes at {point!r} of global step {step}", file=sys.stderr,
        flush=True)
  os.kill(os.getpid(), signal.SIGSTOP)
