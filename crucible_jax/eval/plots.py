"""PNG figures of a run: loss curves per stage, cross-modal retrieval examples, VQA accuracy per question type."""

import pathlib
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crucible_jax.data.tokenizers import Tokenizer  # noqa: E402


def loss_curves(history: Sequence[Mapping[str, float]], path: pathlib.Path) -> None:
  """One panel per stage: total loss and each objective term against the global step."""
  stages = list(dict.fromkeys(row["stage"] for row in history))
  fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 3.5), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    rows = [r for r in history if r["stage"] == stage]
    steps = [r["step"] for r in rows]
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")}):
      ax.plot(steps, [r.get(key, np.nan) for r in rows], label=key, lw=2 if key == "loss" else 1)
    ax.set(title=f"stage: {stage}", xlabel="global step", yscale="log")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _show(ax, batch: Mapping[str, np.ndarray], modality: str, i: int, tokenizer: Tokenizer) -> None:
  """Draw sample `i` of `modality` on `ax`: pixels, a frame strip, a waveform, or the caption text."""
  ax.set_xticks([])
  ax.set_yticks([])
  if modality == "image":
    ax.imshow(batch["image"][i, ..., 0], cmap="gray_r")
  elif modality == "video":
    frames = batch["video"][i, ..., 0]
    ax.imshow(np.concatenate(list(frames), axis=1), cmap="gray_r")
  elif modality == "audio":
    n = int(batch["audio_len"][i])
    ax.plot(batch["audio"][i, :n], lw=0.3)
  else:  # matplotlib's bundled font has no CJK glyphs: Chinese captions are shown with their digits spelled out
    caption = tokenizer.decode(batch["text"][i])
    if not caption.isascii():
      digits = "".join(str(d) for d in batch["digits"][i] if d >= 0)
      caption = f"[zh] {digits}"
    ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=7, wrap=True)


def retrieval_examples(batch: Mapping[str, np.ndarray], embeddings: Mapping[str, np.ndarray],
                       pairs: Sequence[tuple[str, str]], path: pathlib.Path, *, tokenizer: Tokenizer, queries: int = 3,
                       k: int = 5) -> None:
  """For each (query, candidate) modality pair: queries and their top-k candidates; green = same string."""
  rows = [(q, c, i) for q, c in pairs for i in range(queries)]
  fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.9 * (k + 1), 1.1 * len(rows)), squeeze=False)
  for row, (query_m, cand_m, i) in enumerate(rows):
    scores = embeddings[cand_m] @ embeddings[query_m][i]
    _show(axes[row, 0], batch, query_m, i, tokenizer)
    axes[row, 0].set_ylabel(f"{query_m}→{cand_m}", fontsize=7)
    for col, j in enumerate(np.argsort(-scores)[:k], start=1):
      _show(axes[row, col], batch, cand_m, j, tokenizer)
      hit = batch["string_id"][j] == batch["string_id"][i]
      for spine in axes[row, col].spines.values():
        spine.set_color("green" if hit else "red")
        spine.set_linewidth(2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def vqa_by_type(results: Mapping[str, float], question_types: Sequence[str], path: pathlib.Path) -> None:
  """Bar chart of VQA accuracy per question family (keys `*/vqa/accuracy_<index>`)."""
  values = []
  for index, name in enumerate(question_types):
    matches = [v for key, v in results.items() if key.endswith(f"vqa/accuracy_{index}")]
    values.append(matches[0] if matches else np.nan)
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.bar(list(question_types), values, color="tab:blue")
  ax.set(ylim=(0, 1), ylabel="accuracy", title="VQA accuracy by question type")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
