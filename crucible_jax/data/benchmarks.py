"""The grain pipeline for real benchmarks read from a local directory in their official layout (no downloads).

source (a `formats` loader) → shuffle → repeat → per-process shard → complete to the batch schema → batch.
Completion (`complete`) fills what a source lacks — absent modalities with zeros (`formats.fill_absent`), digits
with -1, `weight` with 1 — so every benchmark yields exactly the keys and shapes of `schema.example_batch(data_cfg)`,
the same batch the compiled train step was built for. Eval batches cover every sample once, in order, and pad the
last batch with weight-0 samples, like DigitWorld's. `registry.make_train_iterator`/`make_eval_batches` dispatch
here for the benchmarks' names; the batching itself is `loader.train_batches`/`eval_batches` (own data's too).
Experiment files import `benchmark_data_config` only, so the loaders, PIL and grain load lazily, where data is read
(`crucible bench step` runs without the data stack).
"""

import dataclasses
import functools
import importlib
import inspect
import os
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from crucible_jax.common_types import MODALITIES, TEXT, present_key
from crucible_jax.data import schema
from crucible_jax.data.tokenizers import default_tokenizer_config, tokenizer_of

BENCHMARKS_ENV = "CRUCIBLE_BENCHMARKS_DIR"  # parent of every benchmark's root: $CRUCIBLE_BENCHMARKS_DIR/<name>
OUT_OF_VOCAB = -2  # `answers` entry of a human answer outside the VQA answer vocabulary (-1 is padding)
_FILL = {"digits": -1, "answer": -1, "answers": -1, "speaker": -1, "string_id": -1}  # values of keys a source lacks


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """How one benchmark's data config becomes a `formats` loader."""

  loader: str  # `formats.open_benchmark` name = module of crucible_jax.data.formats; its docstring has the layout
  args: Callable[[ml_collections.ConfigDict], dict[str, Any]]  # loader arguments from the data config
  pairs: bool = False  # records are (item, caption) pairs: a retrieval eval lists each item once (RetrievalView)


BENCHMARKS: dict[str, Benchmark] = {
    "coco": Benchmark("coco", lambda d: dict(
        image_size=tuple(d.image_size), channels=d.channels, text_len=d.text_len, tokenizer=tokenizer_of(d)),
        pairs=True),
    "vqa_v2": Benchmark("vqa", lambda d: dict(
        image_size=tuple(d.image_size), channels=d.channels, question_len=d.question_len,
        tokenizer=tokenizer_of(d, "question_len"),
        top_k=d.get("answer_vocab_size", 3129))),
    "audioset": Benchmark("audioset", lambda d: dict(
        sample_rate=d.sample_rate, audio_seconds=d.audio_seconds, with_labels=True)),
    "msrvtt": Benchmark("video_text", lambda d: dict(
        video_frames=d.video_frames, frame_size=tuple(d.video_size), channels=d.channels, text_len=d.text_len,
        tokenizer=tokenizer_of(d)),
        pairs=True),
    "librispeech": Benchmark("librispeech", lambda d: dict(
        sample_rate=d.sample_rate, audio_seconds=d.audio_seconds, text_len=d.text_len, tokenizer=tokenizer_of(d))),
}


def default_root(name: str) -> str:
  """$CRUCIBLE_BENCHMARKS_DIR/<name>, else <$CRUCIBLE_DATA_DIR or ~/.cache/crucible_jax>/benchmarks/<name>."""
  parent = os.environ.get(BENCHMARKS_ENV) or os.path.join(
      os.environ.get("CRUCIBLE_DATA_DIR") or os.path.expanduser("~/.cache/crucible_jax"), "benchmarks")
  return os.path.join(parent, name)


def benchmark_data_config(name: str) -> ml_collections.ConfigDict:
  """Data config of benchmark `name`; sizes of modalities it lacks stay 1 so their zero fill costs nothing."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark data.name={name!r}; known: {sorted(BENCHMARKS)} (or digit_world)")
  c = ml_collections.ConfigDict()
  c.name = name  # which benchmark: coco | vqa_v2 | audioset | msrvtt | librispeech
  c.root = default_root(name)  # local directory in the official layout (see the loader's docstring)
  c.splits = ml_collections.ConfigDict()  # split name -> loader arguments, e.g. test=dict(split="val2017")
  c.retrieval_view = False  # eval lists each image/video once and each caption once (COCO 5k / MSR-VTT protocol)
  c.skip_bad_records = False  # drop (and count) bad records instead of raising on the first one
  c.tokenizer = default_tokenizer_config()  # captions / transcripts / questions: byte | sentencepiece | hf | clip_bpe
  c.image_size = (1, 1)  # image (height, width), pixels
  c.channels = 3  # colour channels of images and video frames
  c.video_frames = 1  # frames per clip
  c.video_size = (1, 1)  # frame (height, width), pixels
  c.sample_rate = 16000  # audio samples per second, Hz
  c.audio_seconds = 0.001  # audio length, seconds (zero-padded / truncated to it)
  c.text_len = 1  # caption / transcript length, byte tokens
  c.question_len = 1  # VQA question length, byte tokens
  c.max_digits = 1  # digit-string slots (DigitWorld's targets; always -1 here)
  c.num_workers = 0  # grain worker processes decoding samples (0 = in the main process)
  c.prefetch_buffer = 2  # batches prefetched per process / per worker
  return c


def _formats(name: str) -> Any:
  """The module crucible_jax.data.formats.<name> (imported on first use: it needs PIL)."""
  return importlib.import_module(f"crucible_jax.data.formats.{name}")


def _layout(loader: str) -> str:
  """The 'Layout under `root`' paragraph of a loader module's docstring."""
  doc = inspect.getdoc(_formats(loader)) or ""
  start = doc.find("Layout under")
  return doc[start:].split("\n\n")[0] if start >= 0 else doc


def _missing(data_cfg: ml_collections.ConfigDict, error: FileNotFoundError) -> FileNotFoundError:
  return FileNotFoundError(
      f"benchmark {data_cfg.name!r}: {error}\nexpected data.root={data_cfg.root} in the official layout:\n"
      f"{_layout(BENCHMARKS[data_cfg.name].loader)}\n"
      f"Point --config.data.root=DIR (or ${BENCHMARKS_ENV}/{data_cfg.name}) at it.")


def open_split(data_cfg: ml_collections.ConfigDict, split: str, *, view: bool = False) -> Any:
  """Random-access source of `split` (loader arguments from `data.splits[split]`); FileNotFoundError naming the
  expected path and layout when the data is not there. `view`: the retrieval view, where the config asks for it."""
  if data_cfg.name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark data.name={data_cfg.name!r}; known: {sorted(BENCHMARKS)} (or digit_world)")
  bench = BENCHMARKS[data_cfg.name]
  if split not in data_cfg.splits:
    raise ValueError(f"data.splits has no {split!r} split for benchmark {data_cfg.name!r}; "
                     f"has {list(data_cfg.splits)}")
  if not os.path.isdir(data_cfg.root):
    raise _missing(data_cfg, FileNotFoundError(f"directory not found: {data_cfg.root}"))
  args = {**bench.args(data_cfg), "root": data_cfg.root, "skip_bad_records": data_cfg.skip_bad_records,
          **data_cfg.splits[split].to_dict()}  # the split's own arguments win
  try:
    source = _formats("common").open_benchmark(bench.loader, args)
  except FileNotFoundError as error:
    raise _missing(data_cfg, error) from error
  if data_cfg.name == "audioset" and data_cfg.get("num_labels") != source.num_classes:
    raise ValueError(f"data.num_labels={data_cfg.get('num_labels')} but {data_cfg.root}/class_labels_indices.csv "
                     f"lists {source.num_classes} classes")
  if data_cfg.name == "vqa_v2":
    source = WithHumanAnswers(source, int(data_cfg.get("num_human_answers", 10)))
  if view and data_cfg.retrieval_view and bench.pairs:
    source = RetrievalView(source)
  return source


class WithHumanAnswers:
  """VQA v2 samples plus `answers`: vocabulary indices of the human answers (OUT_OF_VOCAB outside it, -1 pad)."""

  def __init__(self, source: Any, size: int):
    self.source, self.size = source, size  # source: a formats.VqaV2
    self.index = {answer: k for k, answer in enumerate(source.answer_vocab)}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    normalize = _formats("vqa").normalize_answer
    sample = dict(self.source[index])
    humans = self.source.answers_for_question(int(sample["string_id"]))[: self.size]
    answers = np.full((self.size,), -1, np.int32)
    answers[: len(humans)] = [self.index.get(normalize(h), OUT_OF_VOCAB) for h in humans]
    sample["answers"] = answers
    return sample


class RetrievalView:
  """Each item (image or video) once without text, then each caption once without pixels, sharing `string_id`.

  The standard retrieval protocol (COCO 5k: 5,000 images against 25,000 captions): pairs would list an image once
  per caption, and its copies would crowd the text→image ranking. The encoders still run on the zero inputs.
  """

  def __init__(self, source: Any):
    self.source = source  # a formats.CocoCaptions or formats.VideoText
    first: dict[int, int] = {}
    for index, record in enumerate(source.records):  # record = (item, caption index); item is the string_id
      first.setdefault(record[0], index)
    self.items = list(first.values())

  def __len__(self) -> int:
    return len(self.items) + len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    common = _formats("common")
    if index < len(self.items):
      sample = dict(self.source[self.items[index]])
      del sample[TEXT]
      sample[present_key(TEXT)] = np.array(False)
      return sample
    record = index - len(self.items)
    text, _ = common.fit_text(self.source.caption(record), self.source.text_len, self.source.tokenizer)
    return {TEXT: text, "string_id": np.array(self.source.records[record][0], np.int32), **common.flags(TEXT)}


def blank_sample(data_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One padding sample with every key of the data config's batch: zeros, -1 ids, weight 0, nothing present."""
  blank = {key: value[0] for key, value in schema.example_batch(data_cfg, 1).items()}
  for key, fill in _FILL.items():
    if key in blank:
      blank[key] = np.full_like(blank[key], fill)
  return blank


def complete(sample: dict[str, np.ndarray], *, blank: dict[str, np.ndarray], benchmark: str) -> dict[str, np.ndarray]:
  """`sample` with every key of `blank` (absent modalities zero-filled, other keys from `blank`), weight 1."""
  sample = _formats("common").fill_absent(sample, {m: blank[m].shape for m in MODALITIES})
  unknown = sorted(set(sample) - set(blank))
  if unknown:
    raise ValueError(f"benchmark {benchmark!r}: samples carry {unknown}, which the data config's batch lacks "
                     f"(set data.num_labels / data.num_human_answers)")
  out = {}
  for key, fill in blank.items():
    if key not in sample:
      out[key] = np.array(1.0, np.float32) if key == "weight" else fill
      continue
    value = np.asarray(sample[key])
    if value.shape != fill.shape:
      raise ValueError(f"benchmark {benchmark!r}: sample[{key!r}] has shape {value.shape}, data config wants "
                       f"{fill.shape}")
    out[key] = value.astype(fill.dtype, copy=False)
  return out


def completer(data_cfg: ml_collections.ConfigDict) -> Callable[[dict], dict[str, np.ndarray]]:
  """`complete` bound to the data config's blank sample: what `loader.train_batches`/`eval_batches` map with."""
  return functools.partial(complete, blank=blank_sample(data_cfg), benchmark=data_cfg.name)


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict, *, global_batch: int, seed: int, process_index: int | None = None,
    process_count: int | None = None, sample_hook: Callable[[int, dict], dict] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's batches of `data.splits.train`, reshuffled every epoch.

  `sample_hook(step, sample) -> sample` as in `registry.make_train_iterator` (pure and picklable).
  """
  from crucible_jax.data import loader  # pylint: disable=g-import-not-at-top  (grain: only where data is read)
  return loader.train_batches(open_split(data_cfg, "train"), data_cfg, complete=completer(data_cfg),
                              global_batch=global_batch, seed=seed, process_index=process_index,
                              process_count=process_count, sample_hook=sample_hook)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Real samples in an eval pass over `split` (the retrieval view counts items and captions)."""
  return len(open_split(data_cfg, split, view=True))


def make_eval_batches(
    data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int, process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every sample of `split` once, in order, in global batches of `batch_size` (this process gets its slice)."""
  from crucible_jax.data import loader  # pylint: disable=g-import-not-at-top  (grain: only where data is read)
  return loader.eval_batches(open_split(data_cfg, split, view=True), data_cfg, complete=completer(data_cfg),
                             padding=blank_sample(data_cfg), batch_size=batch_size, process_index=process_index,
                             process_count=process_count)


def validate_benchmark_config(data_cfg: ml_collections.ConfigDict) -> None:
  """The config-load check of a benchmark's data config (reads no records)."""
  if "root" not in data_cfg or "splits" not in data_cfg:
    raise ValueError(f"data.name={data_cfg.name!r} is a benchmark: build the data config with "
                     "benchmarks.benchmark_data_config (it needs data.root and data.splits)")
