"""Start an N-process `crucible` job on this machine and supervise it: one dead process stops the whole job.

  python -m crucible_jax.parallel.launch --num-processes 2 [--cpu-devices 4] [--port 12355] \\
      [--heartbeat-timeout 10] -- train --config experiments/digit_world.py:tiny --workdir /tmp/run

Each child joins the job through `initialize_distributed` (coordinator 127.0.0.1:PORT, its own process id, the
given heartbeat timeout) and then runs the `crucible` command line. If a child dies, the others' JAX distributed
clients notice within the heartbeat timeout and abort; the launcher waits `--grace` seconds for that, then
terminates whoever is left (watchdog), names the first failed process and exits with its status. SIGTERM to the
launcher goes to every child: they agree on a step, save one checkpoint together and exit 0. On a cluster,
use `crucible train --coordinator/--num-processes/--process-id` (or SLURM's env) instead: one process per host.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import IO, Mapping, Sequence

HEARTBEAT_ENV = "CRUCIBLE_HEARTBEAT_TIMEOUT_S"
POLL_S = 0.2  # seconds between checks of the children's status


def child_env(process_id: int, num_processes: int, port: int, cpu_devices: int | None,
              heartbeat_s: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """Environment of child `process_id`: coordinator, ids, heartbeat and (optionally) simulated CPU devices."""
  env = dict(os.environ if base is None else base)
  env.update(CRUCIBLE_COORDINATOR=f"127.0.0.1:{port}", CRUCIBLE_NUM_PROCESSES=str(num_processes),
             CRUCIBLE_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  env[HEARTBEAT_ENV] = str(heartbeat_s)
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
  return env


def spawn(argv: Sequence[str], *, num_processes: int, port: int, cpu_devices: int | None = None,
          heartbeat_s: int = 10, logs: Sequence[IO] | None = None,
          extra_env: Mapping[str, str] | None = None) -> list[subprocess.Popen]:
  """Start `num_processes` children running `crucible ARGV` as one JAX job (`logs[i]`: child i's stdout+stderr)."""
  if num_processes < 1:
    raise ValueError(f"num_processes must be ≥ 1, got {num_processes}")
  if logs is not None and len(logs) != num_processes:
    raise ValueError(f"got {len(logs)} log files for {num_processes} processes")
  command = [sys.executable, "-m", "crucible_jax.parallel.launch", "--child", "--", *argv]
  envs = [{**child_env(i, num_processes, port, cpu_devices, heartbeat_s), **(extra_env or {})}
          for i in range(num_processes)]
  return [subprocess.Popen(command, env=envs[i],
                           stdout=None if logs is None else logs[i],
                           stderr=None if logs is None else subprocess.STDOUT) for i in range(num_processes)]


def supervise(procs: list[subprocess.Popen], *, grace_s: float = 30.0) -> int:
  """Wait for every child; after the first failure give the rest `grace_s` to exit, then terminate them."""
  failed_at, first_failure = None, None
  while True:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
      break
    bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if bad and first_failure is None:
      first_failure, failed_at = bad[0], time.monotonic()
      print(f"launch: process {bad[0][0]} exited with status {bad[0][1]}; stopping the job", file=sys.stderr)
    if failed_at is not None and time.monotonic() - failed_at > grace_s:
      for i, p in enumerate(procs):
        if p.poll() is None:
          print(f"launch: process {i} still running {grace_s:.0f}s after the failure; terminating it",
                file=sys.stderr)
          p.send_signal(signal.SIGKILL)
    time.sleep(POLL_S)
  if first_failure is None:
    first_failure = next(((i, c) for i, c in enumerate(codes) if c != 0), None)
  if first_failure is not None:
    print(f"launch: job failed: process {first_failure[0]} exited with status {first_failure[1]}", file=sys.stderr)
    return first_failure[1] if first_failure[1] > 0 else 1
  return 0


def _child(argv: Sequence[str]) -> int:
  """Join the job described by the launcher's env, then run the command line."""
  from crucible_jax.parallel.distributed import initialize_distributed
  initialize_distributed(os.environ["CRUCIBLE_COORDINATOR"], int(os.environ["CRUCIBLE_NUM_PROCESSES"]),
                         int(os.environ["CRUCIBLE_PROCESS_ID"]),
                         heartbeat_timeout_seconds=int(os.environ.get(HEARTBEAT_ENV, "10")))
  from crucible_jax import cli
  return cli.main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: `python -m crucible_jax.parallel.launch [options] -- CRUCIBLE_ARGS`."""
  parser = argparse.ArgumentParser(prog="crucible_jax.parallel.launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-processes", type=int, default=2, help="processes to start on this machine")
  parser.add_argument("--port", type=int, default=12355, help="coordinator port on 127.0.0.1")
  parser.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices per process (testing)")
  parser.add_argument("--heartbeat-timeout", type=int, default=10, help="seconds before a silent peer fails the job")
  parser.add_argument("--grace", type=float, default=30.0, help="seconds the others get to exit after a failure")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the crucible command line")
  args = parser.parse_args(argv)
  rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
  if not rest:
    parser.error("give the crucible command after --, e.g. -- train --config ... --workdir ...")
  if args.child:
    return _child(rest)
  procs = spawn(rest, num_processes=args.num_processes, port=args.port, cpu_devices=args.cpu_devices,
                heartbeat_s=args.heartbeat_timeout)
  signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
  try:
    return supervise(procs, grace_s=args.grace)
  except KeyboardInterrupt:
    for p in procs:
      p.send_signal(signal.SIGTERM)
    return 130


if __name__ == "__main__":
  sys.exit(main())
