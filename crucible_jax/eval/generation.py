"""The caption evaluator of cross-modal generation: exact string and WER against the batch's `caption`.

Generated images are scored by DigitWorld's glyph recogniser (`data/digit_world/recognizer.py`).
"""

from typing import Sequence

import numpy as np

from crucible_jax.common_types import MODALITIES
from crucible_jax.data.tokenizers import byte
from crucible_jax.eval import metrics
from crucible_jax.eval.rows import present_rows, real_rows

_CAPTIONS = byte.ByteTokenizer(1)  # the converter captions in byte tokens (converter.caption_targets)


def check_sources(sources: Sequence[str], who: str) -> tuple[str, ...]:
  """`sources` as a tuple; ValueError naming `who` for a name outside MODALITIES."""
  bad = [m for m in sources if m not in MODALITIES]
  if bad:
    raise ValueError(f"{who}: unknown source modalities {bad}; expected names from {MODALITIES}")
  return tuple(sources)


class CaptionEvaluator:
  """Greedy (or beam) captions from each source vs the batch's `caption`: exact-string accuracy and WER."""

  heads = ("caption",)

  def __init__(self, sources: Sequence[str] = ("image", "video", "audio")):
    self.sources = check_sources(sources, "caption evaluator")
    self._refs = {m: [] for m in self.sources}
    self._hyps = {m: [] for m in self.sources}

  def update(self, outputs, batch):
    real = real_rows(batch)
    if "caption" not in batch:
      raise ValueError("caption evaluator: the batch has no `caption` to score against (data.caption_len = 0)")
    captions = np.asarray(batch["caption"])
    for m in self.sources:
      if m not in outputs["caption_ids"]:
        raise ValueError(f"caption evaluator: the model does not caption {m!r} (model.converter.caption_sources)")
      ids = np.asarray(outputs["caption_ids"][m])
      for row in np.flatnonzero(real & present_rows(outputs, batch, m)):
        self._refs[m].append(_CAPTIONS.decode(captions[row]))
        self._hyps[m].append(_CAPTIONS.decode(ids[row]))

  def result(self):
    out = {}
    for m in self.sources:
      refs, hyps = self._refs[m], self._hyps[m]
      if refs:
        out[f"caption_from_{m}/accuracy"] = float(np.mean([r == h for r, h in zip(refs, hyps)]))
        out[f"caption_from_{m}/wer"] = metrics.word_error_rate(refs, hyps)
    return out


