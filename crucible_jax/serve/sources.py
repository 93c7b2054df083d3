"""Collections to index: SOURCE strings to batches of model inputs plus item records.

SOURCE is `digit_world:SPLIT`, `manifest:FILE.jsonl` (or `.csv`) or `shards:'DIR/*.tar'` (own data, see
`own_collection`). Each yields (samples in the batch, {modality: (encoder inputs, item records)}).
"""

from typing import Any, Iterator

import ml_collections
import numpy as np

from crucible_jax.common_types import MODALITIES, present_key
from crucible_jax.data.tokenizers import tokenizer_of
from crucible_jax.serve import media, own_collection
from crucible_jax.serve.export import input_keys

SOURCES = ("digit_world:<split>", "manifest:<file.jsonl|file.csv>", "shards:<'DIR/*.tar'>")


def _payload(modality: str, sample: dict[str, np.ndarray], data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The record fields of one sample's item of `modality`: its text, or its payload as a browser file."""
  if modality == "text":
    return {"text": tokenizer_of(data_cfg).decode(sample["text"]), "mime": media.MIME["text"]}
  if modality == "image":
    payload = media.png(sample["image"])
  elif modality == "audio":
    payload = media.wav(sample["audio"][: int(sample["audio_len"])], int(data_cfg.sample_rate))
  else:
    payload = media.gif(sample["video"])
  return {"payload": payload, "mime": media.MIME[modality]}


def _digit_world(split: str, data_cfg: ml_collections.ConfigDict, batch_size: int, spec: str
                 ) -> tuple[int, Iterator[tuple[int, own_collection.Batch]]]:
  from crucible_jax.data.digit_world import builder, pipeline  # grain and tfds: only when DigitWorld is indexed
  if split not in builder.SPLITS:
    raise ValueError(f"data source {spec!r}: DigitWorld has splits {builder.SPLITS}, not {split!r}")
  total = pipeline.num_examples(data_cfg, split)

  def batches():
    row = 0
    for batch in pipeline.make_eval_batches(data_cfg, split, batch_size=batch_size, process_index=0, process_count=1):
      real = np.flatnonzero(batch["weight"] > 0)
      out = {}
      for m in MODALITIES:
        keep = real[batch[present_key(m)][real]]
        records = [{"source": spec, "source_row": row + int(i), "label": int(batch["string_id"][i]),
                    **_payload(m, {k: v[i] for k, v in batch.items()}, data_cfg)} for i in keep]
        out[m] = ({k: batch[k][keep] for k in input_keys(m)}, records)
      row += len(real)
      yield len(real), out

  return total, batches()


def open_source(spec: str, data_cfg: ml_collections.ConfigDict, batch_size: int
                ) -> tuple[int, Iterator[tuple[int, own_collection.Batch]]]:
  """(samples, iterator of (samples in the batch, {modality: (encoder inputs, records)})) of a SOURCE string;
  `data_cfg` is the model's data config (its preprocessing)."""
  name, _, arg = spec.partition(":")
  if name in own_collection.KINDS and arg:
    return own_collection.open_own(name, arg, data_cfg, batch_size, spec)
  if name == "digit_world" and arg:
    data_cfg = data_cfg.copy_and_resolve_references()
    with data_cfg.unlocked():
      data_cfg.name = "digit_world"
    return _digit_world(arg, data_cfg, batch_size, spec)
  raise ValueError(f"unknown data source {spec!r}; supported: {', '.join(SOURCES)}")
