"""Load generation for `bench search`: a `crucible serve` subprocess, open-loop fixed-rate load, saturation."""

import concurrent.futures
import contextlib
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Iterator, Sequence

import numpy as np

from crucible_jax.serve.client import post


@contextlib.contextmanager
def server(index_dir: pathlib.Path, modalities: Sequence[str], approximate: bool = False,
           timeout_s: float = 600.0) -> Iterator[str]:
  """A `crucible serve` process on a free loopback port (encoders of `modalities` compiled first); its URL."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  priorities = ",".join(f"{m}={len(modalities) - i}" for i, m in enumerate(modalities))
  command = [sys.executable, "-m", "crucible_jax.cli", "serve", "--index", str(index_dir), "--port", str(port),
             "--priorities", priorities, "--deadline-ms", "10000", *(["--approximate"] if approximate else [])]
  process = subprocess.Popen(command)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      if process.poll() is not None:
        raise RuntimeError(f"crucible serve exited with {process.returncode}")
      try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
          break
      except OSError:
        if time.monotonic() > deadline:
          raise RuntimeError("crucible serve did not come up") from None
        time.sleep(0.5)
    yield url
  finally:
    process.terminate()
    process.wait(timeout=30)


def _timed(send: Callable[[], int], scheduled: float) -> tuple[float, int]:
  """(latency from the scheduled send time in ms, HTTP status): queueing in the client counts, as it would."""
  status = send()
  return 1e3 * (time.perf_counter() - scheduled), status


def open_loop(send: Callable[[int], int], qps: float, count: int, workers: int = 64) -> dict[str, float]:
  """`count` requests at a fixed rate `qps` (open loop); p50/p99 latency and the error count."""
  start = time.perf_counter() + 0.05
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = []
    for i in range(count):
      at = start + i / qps
      time.sleep(max(0.0, at - time.perf_counter()))
      futures.append(pool.submit(_timed, lambda i=i: send(i), at))
    results = [f.result() for f in futures]
  latencies = np.array([r[0] for r in results])
  return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
          "errors": int(sum(r[1] != 200 for r in results)), "requests": count,
          "achieved_qps": count / (time.perf_counter() - start)}


def saturation(send: Callable[[int], int], concurrency: int = 16, seconds: float = 5.0) -> float:
  """Completed requests per second with `concurrency` clients sending back to back (closed loop)."""
  stop = time.perf_counter() + seconds
  counter = iter(range(10**9))

  def client() -> int:
    done = 0
    while time.perf_counter() < stop:
      done += send(next(counter)) == 200
    return done

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    total = sum(pool.map(lambda _: client(), range(concurrency)))
  return total / (time.perf_counter() - start)


def sender(url: str, bodies: Sequence[tuple[bytes, str]]) -> Callable[[int], int]:
  """send(i) POSTs the i-th (cyclically) prepared /search body; returns the status."""
  return lambda i: post(f"{url}/search", *bodies[i % len(bodies)])[0]
