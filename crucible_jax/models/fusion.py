"""Adaptive fusion: per-sample modality weights that ignore absent modalities entirely."""

from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from crucible_jax.common_types import BATCH, EMBED, MLP, MODALITIES
from crucible_jax.models.layers import Dtype, dense, layer_norm


def ordered_modalities(names: Iterable[str]) -> tuple[str, ...]:
  """`names` in the fixed order of `MODALITIES`; ValueError for a name outside it."""
  names = set(names)
  unknown = sorted(names - set(MODALITIES))
  if unknown:
    raise ValueError(f"unknown modalities {unknown}; expected a subset of {MODALITIES}")
  return tuple(m for m in MODALITIES if m in names)


def _check_keys(what: str, mapping: Mapping[str, object], modalities: tuple[str, ...]) -> None:
  """ValueError naming the modalities `mapping` lacks."""
  missing = [m for m in modalities if m not in mapping]
  if missing:
    raise ValueError(f"{what} lacks modalities {missing}")


class ModalityNorm(nn.Module):
  """Adaptive per-modality normalisation: a LayerNorm per modality, no params shared across modalities.

  Each modality's learned LN scale sets its magnitude before fusion, so a loud modality cannot drown the rest.
  """

  modalities: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, Float[Array, "b w"]]) -> dict[str, Float[Array, "b w"]]:
    _check_keys("ModalityNorm features", features, self.modalities)
    return {
        m: layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{m}")(features[m])
        for m in self.modalities
    }


class AdaptiveFusion(nn.Module):
  """Weighted sum of modality features; weights = softmax over present modalities of an MLP score.

  Returns (fused f32[B, W], weights f32[B, M]) with M = `modalities` in `MODALITIES` order. An absent
  modality gets weight 0 and its values never reach the output; a sample with none present gives zeros.
  """

  modalities: tuple[str, ...]
  hidden: int | None = None  # width of the scoring MLP; None = the feature width
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, features: Mapping[str, Float[Array, "b w"]], present: Mapping[str, Bool[Array, " b"]]
  ) -> tuple[Float[Array, "b w"], Float[Array, "b m"]]:
    order = ordered_modalities(self.modalities)
    if order != tuple(self.modalities):
      raise ValueError(f"AdaptiveFusion modalities {self.modalities} must follow the order {MODALITIES}")
    _check_keys("AdaptiveFusion present", present, order)
    widths = {m: features[m].shape[-1] for m in order if m in features}
    if len(set(widths.values())) > 1:
      raise ValueError(f"AdaptiveFusion needs one feature width for all modalities, got {widths}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normed = ModalityNorm(order, name="modality_norm", **kw)(features)
    mask = jnp.stack([present[m] for m in order], axis=-1)
    stacked = jnp.stack([normed[m] for m in order], axis=1)
    stacked = jnp.where(mask[..., None], stacked, 0).astype(jnp.float32)
    width = stacked.shape[-1]
    hidden = dense(self.hidden or width, (EMBED, MLP), name="score_hidden", **kw)(stacked)
    scores = dense(1, (MLP, None), use_bias=False, name="score_out", **kw)(nn.gelu(hidden))[..., 0].astype(jnp.float32)
    any_present = jnp.any(mask, axis=-1, keepdims=True)
    logits = jnp.where(mask, scores, -jnp.inf)
    logits = jnp.where(any_present, logits, 0.0)
    weights = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    fused = jnp.einsum("bm,bmw->bw", weights, stacked)
    return nn.with_logical_constraint(fused, (BATCH, EMBED)), weights
