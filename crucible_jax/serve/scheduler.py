"""Micro-batching of queries per encoder, in modality priority order, under per-request deadlines.

One worker runs encoder batches one at a time (a small CPU box: concurrent XLA calls would only contend). Each query
carries a priority (its modality's configured one, or the router's score of it); a modality's queue ranks by its
highest-priority query. The worker serves the top-ranked queue first, taking up to `max_batch` queries after waiting
at most `max_wait_s` for a batch to fill. Before each batch it projects when every queued query would finish (service
order, each modality's measured batch time) and drops those that would miss their deadline: under strict priority
these are the lowest-priority modalities' queries. A dropped query raises `Dropped`; a served one returns an
`Encoding` that names the modalities whose batches were run first while it waited (deferred behind them). The
response reports both.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable, Mapping

import numpy as np


class Dropped(Exception):
  """A query's encoding was shed: it would have missed its deadline."""

  def __init__(self, modality: str, reason: str):
    super().__init__(f"{modality} encoding dropped: {reason}")
    self.modality, self.reason = modality, reason


@dataclasses.dataclass(frozen=True)
class Encoding:
  """A query's embedding [dim] and the modalities whose batches the worker chose first while it waited."""

  vector: np.ndarray
  deferred_behind: tuple[str, ...]


@dataclasses.dataclass
class _Job:
  inputs: dict[str, np.ndarray]  # one query's encoder inputs, batch of 1
  deadline: float  # time.monotonic() by which its encoding must be done
  future: asyncio.Future
  priority: float  # higher is served first
  behind: list[str] = dataclasses.field(default_factory=list)  # modalities served first while it was queued


class Scheduler:
  """`await encode(modality, inputs, deadline)` from request handlers; `start()` once inside the event loop."""

  def __init__(self, encode: Callable[[str, dict[str, np.ndarray]], np.ndarray], priorities: Mapping[str, float],
               max_batch: int = 16, max_wait_s: float = 0.002, on_batch: Callable[[str, int, float], None] = None):
    self._encode, self.priorities = encode, dict(priorities)
    self.max_batch, self.max_wait_s, self._on_batch = max_batch, max_wait_s, on_batch
    self._queues: dict[str, collections.deque[_Job]] = {m: collections.deque() for m in self.priorities}
    self.batch_seconds: dict[str, float] = {m: 0.0 for m in self.priorities}  # EMA of a batch's encode time
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encoder")
    self._wake: asyncio.Event | None = None
    self._task: asyncio.Task | None = None

  def start(self) -> None:
    self._wake = asyncio.Event()
    self._task = asyncio.get_running_loop().create_task(self._serve())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      await asyncio.gather(self._task, return_exceptions=True)
    self._pool.shutdown(wait=False, cancel_futures=True)

  async def encode(self, modality: str, inputs: dict[str, np.ndarray], deadline: float,
                   priority: float | None = None) -> Encoding:
    """The query's embedding; raises Dropped if it would miss `deadline` (time.monotonic()). `priority` defaults
    to the modality's."""
    if modality not in self._queues:
      raise ValueError(f"no encoder for modality {modality!r}")
    priority = self.priorities[modality] if priority is None else priority
    job = _Job(inputs, deadline, asyncio.get_running_loop().create_future(), priority)
    self._queues[modality].append(job)
    self._wake.set()
    return await job.future

  def _order(self) -> list[str]:
    rank = {m: max(j.priority for j in queue) for m, queue in self._queues.items() if queue}
    return sorted(rank, key=lambda m: -rank[m])

  def _shed(self, now: float) -> None:
    """Drop every queued query projected to finish after its deadline, except the next batch's (nothing is ahead of
    it: it runs, and its time keeps the estimate current)."""
    finish, first = now, True
    for m in self._order():
      queue, kept = self._queues[m], collections.deque()
      for start in range(0, len(queue), self.max_batch):
        finish += self.batch_seconds[m]
        for job in list(queue)[start:start + self.max_batch]:
          if finish > job.deadline and not job.future.done() and not first:
            job.future.set_exception(Dropped(m, f"projected {1e3 * (finish - job.deadline):.0f} ms past the "
                                                f"deadline behind higher-priority encodings"))
          elif not job.future.done():
            kept.append(job)
        first = False
      self._queues[m] = kept

  async def _serve(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      order = self._order()
      if not order:
        self._wake.clear()
        await self._wake.wait()
        continue
      if len(self._queues[order[0]]) < self.max_batch and self.max_wait_s > 0:
        await asyncio.sleep(self.max_wait_s)  # let concurrent queries join the batch
      self._shed(time.monotonic())
      order = self._order()
      if not order:
        continue
      modality = order[0]
      queue = self._queues[modality]
      jobs = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
      for other in order[1:]:
        for job in self._queues[other]:
          if modality not in job.behind:
            job.behind.append(modality)
      inputs = {k: np.concatenate([j.inputs[k] for j in jobs]) for k in jobs[0].inputs}
      start = time.monotonic()
      try:
        vectors = await loop.run_in_executor(self._pool, self._encode, modality, inputs)
      except Exception as e:  # a failing encoder fails its queries, never the worker
        for job in jobs:
          if not job.future.done():
            job.future.set_exception(e)
        continue
      elapsed = time.monotonic() - start
      previous = self.batch_seconds[modality]
      # Down at once (a first batch's compile must not outlive it), up smoothly (one slow batch is not a trend).
      self.batch_seconds[modality] = elapsed if elapsed < previous or previous == 0.0 else 0.8 * previous + 0.2 * elapsed
      if self._on_batch is not None:
        self._on_batch(modality, len(jobs), elapsed)
      for job, vector in zip(jobs, vectors):
        if not job.future.done():
          job.future.set_result(Encoding(vector, tuple(job.behind)))
