"""Analytic matmul FLOPs of the transformer towers, to cross-check XLA's cost analysis."""

import math

import ml_collections


def transformer_forward_flops(batch: int, tokens: int, width: int, mlp: int, depth: int) -> float:
  """Matmul FLOPs of `depth` pre-LN blocks: qkv+out projections, attention scores and mixing, the MLP."""
  projections = 2 * batch * tokens * width * 4 * width
  attention = 2 * 2 * batch * tokens * tokens * width
  feedforward = 2 * 2 * batch * tokens * width * mlp
  return depth * (projections + attention + feedforward)


def tower_tokens(model: ml_collections.ConfigDict, modality: str) -> tuple[int, int]:
  """(tokens, flattened input size per token) of a modality's patchifier."""
  if modality == "image":
    ph, pw = model.image.patch
    h, w = model.image.size
    return (h // ph) * (w // pw), ph * pw * model.image.channels
  if modality == "video":
    t, ph, pw = model.video.tubelet
    h, w = model.video.size
    return (model.video.frames // t) * (h // ph) * (w // pw), t * ph * pw * model.video.channels
  if modality == "text":
    return model.text.max_len, 0
  if modality == "audio":
    frames = 1 + int(model.audio.seconds * model.audio.sample_rate) // model.audio.hop
    return math.ceil(frames / model.audio.patch_frames), model.audio.patch_frames * model.audio.n_mels
  raise ValueError(f"unknown modality {modality!r}")


def contrastive_train_flops(model: ml_collections.ConfigDict, batch: int) -> float:
  """Forward+backward matmul FLOPs (3× forward) of the embed heads and the pairwise logits of a CLIP step."""
  forward = 0.0
  for m in model.modalities:
    cfg = model[m]
    tokens, patch = tower_tokens(model, m)
    forward += 2 * batch * tokens * patch * cfg.width  # patch embedding
    forward += transformer_forward_flops(batch, tokens, cfg.width, cfg.mlp, cfg.depth)
    forward += 2 * batch * cfg.width * model.joint_dim  # projection to the shared space
  pairs = len(model.modalities) * (len(model.modalities) - 1) // 2
  forward += pairs * 2 * batch * batch * model.joint_dim
  return 3 * forward
