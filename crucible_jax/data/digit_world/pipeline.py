"""DigitWorld's grain pipeline: recipes → shuffle → repeat → global batch → this process's block → render.

Rendering happens here, per element, deterministically from (record, seed, epoch), so the iterator state alone
(`get_state`/`set_state`) resumes a run exactly, with any number of worker processes. `data/registry.py` reads
DigitWorld through this module; the generic plumbing is `data/loader.py`.
"""

import functools
import logging
import pathlib
import threading
import types
from typing import Any, Callable, Iterator, Mapping

import grain
import ml_collections
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, present_key
from crucible_jax.data import loader, verify
from crucible_jax.data.digit_world import builder, render
from crucible_jax.data.digit_world.validation import validate_data_config

_DATA_OF = {IMAGE: ("image",), VIDEO: ("video",), AUDIO: ("audio", "audio_len"), TEXT: ("text",)}


def drop_modalities(
    sample: dict[str, np.ndarray], probabilities: Mapping[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
  """Hide each modality with its probability (zeros, `<m>_present=False`); at least one stays present."""
  unknown = set(probabilities) - set(MODALITIES)
  if unknown:
    raise ValueError(f"drop_modalities names unknown modalities {sorted(unknown)}; known: {MODALITIES}")
  dropped = [rng.random() < probabilities.get(m, 0.0) for m in MODALITIES]
  if all(dropped):
    dropped[rng.integers(len(MODALITIES))] = False
  for modality, drop in zip(MODALITIES, dropped):
    if drop:
      for key in _DATA_OF[modality]:
        sample[key] = np.zeros_like(sample[key])
      sample[present_key(modality)] = np.bool_(False)
  return sample


def _render(recipe: Mapping[str, Any], data_cfg: ml_collections.ConfigDict, split_seed: int, epoch: int,
            split: str) -> dict[str, np.ndarray]:
  """render_sample, with errors naming the record (or, with skip_bad_records, a padding sample instead)."""
  try:
    return render.render_sample(recipe, data_cfg, split_seed=split_seed, epoch=epoch)
  except (ValueError, KeyError, IndexError) as error:
    where = f"DigitWorld {split} record {recipe.get('index', '?')} (epoch {epoch})"
    if not data_cfg.skip_bad_records:
      raise ValueError(f"{where} failed to render: {error}") from error
    logging.warning("skipping %s: %s", where, error)
    return render.padding_sample(data_cfg)


IN_MEMORY_RECORDS = 200_000  # splits up to this many records (~850 B each) are read into memory once per process
_LOAD_LOCK = threading.Lock()  # grain's reader threads share a source: one of them loads the split


class RecipeSource:
  """A DigitWorld split's recipes, equal to `builder.digit_world_source`'s record for record, ~6x cheaper a read.

  The split's bytes are read into memory in one batched pass on first use (a lone ArrayRecord read costs ~100 us
  of zstd set-up, a batched one ~15 us), and records are decoded field by field from the tf.Example proto
  instead of by tfds's generic parser (~250 us). Larger splits than IN_MEMORY_RECORDS are read per record.
  """

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str):
    from tensorflow_datasets.core import decode  # pylint: disable=g-import-not-at-top

    if split not in builder.SPLITS:
      raise ValueError(f"unknown DigitWorld split {split!r}; choose from {builder.SPLITS}")
    digit_world = builder.prepare_digit_world(data_cfg)
    self._raw = digit_world.as_data_source(split=split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
    self._specs = {name: (info.np_dtype, info.shape)
                   for name, info in digit_world.info.features.get_tensor_info().items()}
    self._records: list[bytes] | None = None

  def __len__(self) -> int:
    return len(self._raw)

  def __getstate__(self) -> dict[str, Any]:  # worker processes get the reader, not this process's bytes
    return {**self.__dict__, "_records": None}

  def _read(self, index: int) -> bytes:
    if len(self._raw) > IN_MEMORY_RECORDS:
      return self._raw[index]
    if self._records is None:
      with _LOAD_LOCK:
        if self._records is None:
          self._records = list(self._raw.__getitems__(range(len(self._raw))))
    return self._records[index]

  def __getitem__(self, index: int) -> dict[str, Any]:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    features = tf_example_pb2.Example.FromString(self._read(int(index))).features.feature
    record = {}
    for name, (dtype, shape) in self._specs.items():
      if dtype == np.dtype(object):  # text: bytes, as tfds gives it
        record[name] = features[name].bytes_list.value[0]
      elif shape == ():  # scalars: Python ints, as tfds gives them
        record[name] = int(features[name].int64_list.value[0])
      else:
        record[name] = np.array(features[name].int64_list.value, dtype).reshape(shape)
    return record


def tag_epoch(index: int, recipe: Mapping[str, Any], *, epoch_size: int) -> tuple[int, Mapping[str, Any]]:
  """(epoch, recipe) for position `index` of the repeated stream."""
  return index // epoch_size, recipe


def _read_tagged(index: int, record: int, *, source: RecipeSource, epoch_size: int) -> tuple[int, Mapping[str, Any]]:
  """(epoch, recipe of `record`) for position `index` of the repeated, shuffled stream of record indices."""
  return tag_epoch(index, source[record], epoch_size=epoch_size)


def _render_train(item: tuple[int, Mapping[str, Any]], *, data_cfg: ml_collections.ConfigDict,
                  seed: int) -> dict[str, np.ndarray]:
  epoch, recipe = item
  sample = _render(recipe, data_cfg, seed, epoch, "train")
  probabilities = dict(data_cfg.drop_modalities)
  if any(p > 0 for p in probabilities.values()):
    rng = np.random.default_rng([int(recipe["render_seed"]), seed, epoch, len(MODALITIES)])
    sample = drop_modalities(sample, probabilities, rng)
  return sample


def train_recipes(
    data_cfg: ml_collections.ConfigDict, *, seed: int, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
  """This process's infinite stream of (epoch, recipe): shuffled anew each epoch, sharded across processes."""
  process_index, process_count = loader.process_layout(process_index, process_count)
  source = RecipeSource(data_cfg, "train")
  # Shuffle record indices and read in a map: the same order as shuffling the source, without grain's per-read
  # source metrics (a byte-size walk of every record).
  dataset = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  dataset = dataset.map_with_index(functools.partial(_read_tagged, source=source, epoch_size=len(source)))
  return dataset[process_index::process_count]


def _plain_config(data_cfg: ml_collections.ConfigDict) -> types.SimpleNamespace:
  """The data config as a plain namespace: the renderer reads ~10 fields per sample, a ConfigDict read is ~3 us."""
  return types.SimpleNamespace(**data_cfg.to_dict())


def _render_train_batch(
    step: int, items: list[tuple[int, Mapping[str, Any]]], *, data_cfg: ml_collections.ConfigDict, seed: int,
    hook: Callable[[int, dict], dict] | None,
) -> dict[str, np.ndarray]:
  """The batch of train step `step`: each (epoch, recipe) rendered, passed through `hook(step, sample)`, stacked."""
  data_cfg = _plain_config(data_cfg)
  samples = [_render_train(item, data_cfg=data_cfg, seed=seed) for item in items]
  if hook is not None:
    samples = [hook(step, sample) for sample in samples]
  return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict, *, global_batch: int, seed: int, process_index: int | None = None,
    process_count: int | None = None, sample_hook: Callable[[int, dict], dict] | None = None,
) -> grain.DatasetIterator:
  """Endless iterator of this process's numpy batches (global_batch / process_count samples each).

  `sample_hook(step, sample) -> sample` (e.g. a curriculum's weights) must be a pure, picklable function of its
  arguments: then the iterator state alone resumes it exactly.
  """
  validate_data_config(data_cfg)
  process_index, process_count = loader.process_layout(process_index, process_count)
  local_batch = loader.local_batch_size(global_batch, process_count)
  # Every process reads the recipes of the whole global batch (cheap) and renders its contiguous block of it, so the
  # global batch is the same on any number of processes: per-shard computations (the router's groups) match too.
  dataset = train_recipes(data_cfg, seed=seed, process_index=0, process_count=1)
  dataset = dataset.batch(global_batch, drop_remainder=True, batch_fn=functools.partial(
      loader.block, start=process_index * local_batch, size=local_batch))
  # Then render a whole batch per map call: one grain element per step, not per sample.
  dataset = dataset.map_with_index(functools.partial(_render_train_batch, data_cfg=data_cfg, seed=seed,
                                                     hook=sample_hook))
  return iter(loader.maybe_mp_prefetch(dataset.to_iter_dataset(loader.read_options(data_cfg)), data_cfg))


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Real samples in `split`: what eval metrics divide by (padding has weight 0)."""
  return len(RecipeSource(data_cfg, split))


def make_eval_batches(
    data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int, process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every sample of `split` once, in order, in batches of `batch_size` (global; this process gets its slice).

  The last batch is filled with padding samples: zeros, weight 0, every `<m>_present` False, digits -1. Metrics
  ignore them by masking with `weight > 0`; `num_examples(data_cfg, split)` is the count of real samples.
  Rendering uses (data_cfg.seed, epoch 0): the same augmentations on every call.
  """
  validate_data_config(data_cfg)
  render_eval = functools.partial(_render, data_cfg=data_cfg, split_seed=int(data_cfg.seed), epoch=0, split=split)
  return loader.eval_batches(RecipeSource(data_cfg, split), data_cfg, complete=render_eval,
                             padding=render.padding_sample(data_cfg), batch_size=batch_size,
                             process_index=process_index, process_count=process_count)


def check_split(data_cfg: ml_collections.ConfigDict, split: str) -> None:
  """Verify `split`'s ArrayRecord files against dataset_info.json (counts, and every chunk's hash up to
  `verify.FULL_READ_BYTES`); `verify.InputFileError` names the file."""
  if split not in builder.SPLITS:
    raise ValueError(f"unknown DigitWorld split {split!r}; choose from {builder.SPLITS}")
  digit_world = builder.prepare_digit_world(data_cfg)
  info = digit_world.info.splits[split]
  directory = pathlib.Path(digit_world.data_dir)
  paths = sorted(directory.glob(f"{digit_world.name}-{split}.array_record-*"))
  if len(paths) != len(info.shard_lengths):
    raise verify.InputFileError(f"split {split!r} in {directory} has {len(paths)} ArrayRecord files, its "
                                f"dataset_info.json lists {len(info.shard_lengths)}")
  for path, records in zip(paths, info.shard_lengths):
    verify.check_array_record(path, records)
