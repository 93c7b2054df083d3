"""Generic input plumbing every source shares: per-process layout, grain read options and worker prefetch, batches of
a random-access source (train: shuffled, repeated, resumable; eval: every sample once, padded) and global arrays.

Sources (DigitWorld's pipeline, the benchmarks, own data) build on these; `data/registry.py` picks the source.
"""

import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

Sample = dict[str, np.ndarray]
SampleHook = Callable[[int, dict], dict]


def process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process, jax's when not given; ValueError when index is outside [0, count)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} outside [0, process_count={count})")
  return index, count


def local_batch_size(global_batch: int, process_count: int) -> int:
  """Samples per process of a global batch; ValueError unless it divides evenly."""
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} is not a positive multiple of process_count {process_count}")
  return global_batch // process_count


def block(items: Sequence[Any], *, start: int, size: int) -> list[Any]:
  """This process's contiguous block of a global batch's items."""
  return list(items[start:start + size])


def at_step(index: int, sample: Sample, *, hook: SampleHook, local_batch: int) -> Sample:
  """Call `hook(step, sample)` with the train step this element lands in (one batch per step)."""
  return hook(index // local_batch, sample)


def read_options(data_cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
  """grain's reader threads and prefetch for `data_cfg`."""
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=int(data_cfg.prefetch_buffer))


def maybe_mp_prefetch(dataset: grain.IterDataset, data_cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  """`dataset` read by `data.num_workers` worker processes (unchanged for 0)."""
  if data_cfg.num_workers <= 0:
    return dataset
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # grain #1355: workers read absl flags, unparsed outside absl.app
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=int(data_cfg.num_workers), per_worker_buffer_size=int(data_cfg.prefetch_buffer)))


def _train_element(position: int, record: int, *, source: Any, seed: int) -> Sample:
  """Record `record` at `position` of the repeated stream; a source with `train_sample` augments it with an rng
  of (seed, position) alone, so the iterator state resumes the augmentation exactly."""
  augment = getattr(source, "train_sample", None)
  return source[record] if augment is None else augment(record, np.random.default_rng([seed, position]))


def train_batches(
    source: Any, data_cfg: ml_collections.ConfigDict, *, complete: Callable[[Sample], Sample], global_batch: int,
    seed: int, process_index: int | None = None, process_count: int | None = None,
    sample_hook: SampleHook | None = None,
) -> Iterator[Sample]:
  """Endless iterator of this process's batches of a random-access `source`, each sample passed through
  `complete` (picklable: to the data config's batch keys), reshuffled every epoch."""
  process_index, process_count = process_layout(process_index, process_count)
  local_batch = local_batch_size(global_batch, process_count)
  # Shuffling record indices gives the same order as shuffling the source.
  dataset = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  dataset = dataset.map_with_index(functools.partial(_train_element, source=source, seed=seed))
  dataset = dataset[process_index::process_count].map(complete)
  if sample_hook is not None:
    dataset = dataset.map_with_index(functools.partial(at_step, hook=sample_hook, local_batch=local_batch))
  dataset = dataset.batch(local_batch, drop_remainder=True).to_iter_dataset(read_options(data_cfg))
  return iter(maybe_mp_prefetch(dataset, data_cfg))


def _eval_element(position: int, *, source: Any, complete: Callable[[Sample], Sample], padding: Sample,
                  global_batch: int, local_batch: int, process_index: int) -> Sample:
  """Sample for slot `position` of this process: its slice of each global batch, past the end = padding."""
  batch, offset = divmod(position, local_batch)
  index = batch * global_batch + process_index * local_batch + offset
  if index >= len(source):
    return dict(padding)
  return complete(source[index])


def eval_batches(
    source: Any, data_cfg: ml_collections.ConfigDict, *, complete: Callable[[Sample], Sample], padding: Sample,
    batch_size: int, process_index: int | None = None, process_count: int | None = None,
) -> Iterator[Sample]:
  """Every sample of a random-access `source` once, in order, in global batches of `batch_size` (this process gets
  its slice) filled up with `padding` (weight 0)."""
  process_index, process_count = process_layout(process_index, process_count)
  local_batch = local_batch_size(batch_size, process_count)
  num_batches = math.ceil(len(source) / batch_size)
  dataset = grain.MapDataset.range(num_batches * local_batch).map(functools.partial(
      _eval_element, source=source, complete=complete, padding=padding, global_batch=batch_size,
      local_batch=local_batch, process_index=process_index))
  dataset = dataset.batch(local_batch, drop_remainder=True).to_iter_dataset(read_options(data_cfg))
  return iter(maybe_mp_prefetch(dataset, data_cfg))


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
  """Assemble every process's local batch into global arrays, sharded along the batch axis by `sharding`."""
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
