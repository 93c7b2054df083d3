"""The campaign's `crucible train` children: run to the end, or frozen at a fault point and killed with SIGKILL."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from crucible_jax.parallel.distributed import CPU_COLLECTIVE_PATIENCE, FAULT_ENV, apply_xla_flags

POLL_S = 0.05
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
NOT_COMPARED = ("wall_s",)  # results.json keys that differ between identical runs


@dataclasses.dataclass
class Outcome:
  """How a child ended: exit status (-9: killed at its fault point), and its stdout+stderr."""
  rc: int
  log: str
  killed: bool = False


@dataclasses.dataclass
class Runner:
  """Starts `crucible train --config CONFIG OVERRIDES` children, one at a time, logging to `root/logs/NAME.log`."""
  config: str  # experiments/NAME.py[:ARG]
  overrides: list[str]  # --config.KEY=VALUE, for every child
  root: pathlib.Path
  env: dict[str, str]  # added to this process's environment
  timeout_s: float = 3600.0

  def train(self, name: str, workdir: pathlib.Path, *extra: str, freeze_at: str | None = None,
            inject: str | None = None, seed: int = 0) -> Outcome:
    """One run. `freeze_at` (`POINT@STEP`, see CRUCIBLE_FAULT) freezes it there, then it is killed with SIGKILL;
    `inject` (`KIND@STEP`, see chaos/inject.py) patches a fault into the child."""
    argv = ["train", "--config", self.config, "--workdir", str(workdir), *self.overrides, *extra]
    prefix = ["-m", "crucible_jax.chaos.inject", inject, "--seed", str(seed), "--"] if inject else ["-m",
                                                                                                     "crucible_jax.cli"]
    env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
    # One process per child, one child at a time: a shared persistent cache compiles each program once.
    env.setdefault(CACHE_ENV, str(self.root / "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.pop(FAULT_ENV, None)
    apply_xla_flags(CPU_COLLECTIVE_PATIENCE, env)  # a child's simulated devices may lag on a loaded box
    if freeze_at:
      env[FAULT_ENV] = f"0:{freeze_at}"
    log_path = self.root / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
      proc = subprocess.Popen([sys.executable, *prefix, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
      killed = _wait_or_kill_when_frozen(proc, self.timeout_s)
    return Outcome(proc.returncode, log_path.read_text(), killed)


def _wait_or_kill_when_frozen(proc: subprocess.Popen, timeout_s: float) -> bool:
  """Wait for `proc`; if it stops (SIGSTOP at its fault point), SIGKILL it. True when it was killed so."""
  deadline = time.monotonic() + timeout_s
  while True:
    pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
    if pid == 0:
      if time.monotonic() > deadline:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"{proc.args} ran longer than {timeout_s:.0f} s")
      time.sleep(POLL_S)
    elif os.WIFSTOPPED(status):
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      return True
    else:
      proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
      return False


def results_of(workdir: pathlib.Path) -> dict[str, float] | None:
  """A finished run's results.json without its wall time; None when there is none."""
  path = workdir / "results.json"
  if not path.is_file():
    return None
  return {k: v for k, v in json.loads(path.read_text()).items() if k not in NOT_COMPARED}


def comparable(workdir: pathlib.Path) -> dict[str, float] | None:
  """results_of plus the loss of every logged step (`train/loss@STEP`; a resumed run's rows replace the
  interrupted run's), so that runs whose final metrics cannot tell them apart are still compared."""
  results = results_of(workdir)
  if results is None:
    return None
  rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {**results, **{f"train/loss@{row['step']}": row["loss"] for row in rows}}


def differing(results: dict[str, float] | None, reference: dict[str, float]) -> list[str]:
  """Keys whose values are not identical to the reference's (all of them when there are no results)."""
  if results is None:
    return sorted(reference)
  return sorted(k for k in reference.keys() | results.keys() if results.get(k) != reference.get(k))
