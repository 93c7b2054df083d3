"""Image–caption retrieval as COCO / Flickr30k papers report it: R@1/5/10 in both directions.

Image→text: an image is a hit at K when any of its captions ranks in its top K. Text→image: a caption is a hit
at K when its one image ranks in its top K. Similarities are cosines of the normalised embeddings.
"""

from typing import Sequence

import numpy as np
from jaxtyping import Float, Int

from crucible_jax.eval import metrics


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_recalls(image_emb: Float[np.ndarray, "images joint"], text_emb: Float[np.ndarray, "texts joint"],
                      caption_image: Int[np.ndarray, " texts"], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """`image_to_text/R@k` and `text_to_image/R@k`; caption i belongs to image `caption_image[i]` (f32 cosines)."""
  caption_image = np.asarray(caption_image)
  if len(text_emb) != len(caption_image):
    raise ValueError(f"{len(text_emb)} caption embeddings for {len(caption_image)} caption ids")
  if len(caption_image) and (caption_image.min() < 0 or caption_image.max() >= len(image_emb)):
    raise ValueError(f"caption image ids must lie in [0, {len(image_emb)})")
  sim = _normalise(image_emb) @ _normalise(text_emb).T
  image_ids = np.arange(len(image_emb))
  out = {}
  for direction, (s, q, c) in {"image_to_text": (sim, image_ids, caption_image),
                               "text_to_image": (sim.T, caption_image, image_ids)}.items():
    scores = metrics.retrieval_metrics(s, q, c, ks)
    out.update({f"{direction}/R@{k}": scores[f"R@{k}"] for k in ks})
  return out
