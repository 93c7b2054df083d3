"""Zero-shot classification, as CLIP measures it: class names × prompt templates → one text vector per class.

Each class's prompts (every template filled with its name) are embedded, L2-normalised, averaged and normalised
again (Radford et al. 2021, open_clip's `build_zero_shot_classifier`); a sample's class is the one whose vector has
the largest cosine with the sample's embedding. Pure numpy over an `embed_texts` callable: no model code here.
"""

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from jaxtyping import Float, Int

EmbedTexts = Callable[[Sequence[str]], Float[np.ndarray, "texts joint"]]


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prompts(class_name: str, templates: Sequence[str]) -> list[str]:
  """`class_name` put into every template; ValueError for a template without exactly one `{}`."""
  for template in templates:
    if template.count("{}") != 1:
      raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' (where the class name goes)")
  return [template.replace("{}", class_name) for template in templates]


def classifier(embed_texts: EmbedTexts, class_names: Sequence[str],
               templates: Sequence[str]) -> Float[np.ndarray, "classes joint"]:
  """One unit vector per class: the normalised mean of its normalised prompt embeddings."""
  if not class_names:
    raise ValueError("zero-shot classification needs at least one class name")
  if not templates:
    raise ValueError("zero-shot classification needs at least one prompt template")
  if len(set(class_names)) != len(class_names):
    duplicate = next(n for n in class_names if list(class_names).count(n) > 1)
    raise ValueError(f"class name {duplicate!r} appears more than once")
  texts = [p for name in class_names for p in prompts(name, templates)]
  vectors = _normalise(np.asarray(embed_texts(texts), np.float64))
  if vectors.shape[0] != len(texts):
    raise ValueError(f"embed_texts returned {vectors.shape[0]} vectors for {len(texts)} prompts")
  return _normalise(vectors.reshape(len(class_names), len(templates), -1).mean(axis=1))


def topk_accuracy(embeddings: Float[np.ndarray, "n joint"], weights: Float[np.ndarray, "classes joint"],
                  labels: Int[np.ndarray, " n"], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """`top{k}`: the fraction of samples whose label is among the k classes of largest cosine (ties: lower index)."""
  embeddings, labels = np.asarray(embeddings, np.float64), np.asarray(labels)
  if embeddings.ndim != 2 or len(embeddings) != len(labels) or not len(labels):
    raise ValueError(f"embeddings {embeddings.shape} and labels {labels.shape} must be [n, dim] and [n], n > 0")
  if labels.min() < 0 or labels.max() >= len(weights):
    raise ValueError(f"labels must lie in [0, {len(weights)}); got [{labels.min()}, {labels.max()}]")
  logits = _normalise(embeddings) @ np.asarray(weights, np.float64).T
  rank = np.argsort(-logits, axis=1, kind="stable")
  position = np.argmax(rank == labels[:, None], axis=1)
  return {f"top{k}": float(np.mean(position < k)) for k in ks}


def evaluate(embed_texts: EmbedTexts, class_names: Sequence[str], templates: Sequence[str],
             embeddings: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
             ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """`{modality}/top{k}` and `{modality}/count` for each modality's sample embeddings against one classifier."""
  weights = classifier(embed_texts, class_names, templates)
  out = {}
  for modality, vectors in embeddings.items():
    out.update({f"{modality}/{name}": v for name, v in topk_accuracy(vectors, weights, labels[modality], ks).items()})
    out[f"{modality}/count"] = float(len(vectors))
  return out


def chunks(n: int, size: int) -> Iterator[slice]:
  """Consecutive slices of at most `size` covering range(n)."""
  return (slice(start, min(start + size, n)) for start in range(0, n, size))


def embed_in_chunks(embed: Callable[[Mapping[str, np.ndarray]], np.ndarray], inputs: Mapping[str, np.ndarray],
                    size: int = 256) -> np.ndarray:
  """`embed` over `size`-row chunks of `inputs` (the last one padded by repeating its final row, so one compile)."""
  n = len(next(iter(inputs.values())))
  size, out = max(1, min(size, n)), []
  for part in chunks(n, size):
    rows = np.arange(part.start, part.start + size).clip(max=part.stop - 1)
    out.append(np.asarray(embed({k: np.asarray(v)[rows] for k, v in inputs.items()}))[:part.stop - part.start])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
