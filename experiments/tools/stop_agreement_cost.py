"""Time the trainer's per-step stop agreement (`any_process`, an all-gather of one flag) on N local processes.

  python experiments/tools/stop_agreement_cost.py --num-processes 2 --cpu-devices 4 --calls 200

Prints the median and 90th percentile of one call, measured on process 0; compare with a train step's time.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np


def _child(process_id: int, num_processes: int, port: int, calls: int) -> None:
  from crucible_jax.parallel.distributed import any_process, initialize_distributed
  initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  for _ in range(5):  # compile and connect
    any_process(False)
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    any_process(False)
    times.append(time.perf_counter() - start)
  if process_id == 0:
    print(f"any_process over {num_processes} processes: median {1e3 * np.median(times):.3f} ms, "
          f"p90 {1e3 * np.percentile(times, 90):.3f} ms ({calls} calls)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--cpu-devices", type=int, default=4)
  parser.add_argument("--calls", type=int, default=200)
  parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    _child(args.child, args.num_processes, args.port, args.calls)
    return
  from crucible_jax.parallel.launch import child_env
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, "--child", str(i), "--port", str(port),
                             "--num-processes", str(args.num_processes), "--calls", str(args.calls)],
                            env=child_env(i, args.num_processes, port, args.cpu_devices, 10))
           for i in range(args.num_processes)]
  sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
  main()
