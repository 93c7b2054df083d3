"""Gradient balancing between modalities: OGM-GE (Peng et al., CVPR 2022) as a gradient-scaling op before fusion.

On-the-fly gradient modulation: each modality's confidence on the true labels (from unimodal predictions under
stop_gradient) gives a discrepancy ratio rho_m = s_m / mean_{j != m} s_j; the dominant modality's gradient is scaled
by k_m = 1 - tanh(alpha * (rho_m - 1)) (k_m = 1 when rho_m <= 1). Gaussian enhancement (GE) adds zero-mean noise
with the gradient's own standard deviation, which restores the generalisation that a smaller gradient loses.
With two modalities this is the paper's rule exactly; with more, each is compared with the mean of the rest.
"""

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jaxtyping import Array, Bool, Float, Int

METHODS = ("none", "ogm_ge")
GE_EPS = 1e-8  # added to the noise std, as in the reference implementation


@dataclasses.dataclass(frozen=True)
class BalanceSpec:
  """Hashable gradient-balancing settings (validated from `model.balance`)."""

  method: str = "none"  # "none" | "ogm_ge"
  alpha: float = 0.5  # OGM strength: k = 1 - tanh(alpha * (rho - 1)) for the dominant modality
  ge_scale: float = 1.0  # Gaussian-enhancement noise std, in units of the gradient's own std (0 = OGM only)


def default_balance_config() -> ml_collections.ConfigDict:
  """`model.balance` defaults: off."""
  cfg = ml_collections.ConfigDict()
  cfg.method = "none"  # gradient balancing before fusion: "none" | "ogm_ge"
  cfg.alpha = 0.5  # OGM-GE modulation strength (unitless; paper uses 0.1-0.8)
  cfg.ge_scale = 1.0  # GE noise std as a multiple of the modulated gradient's std (0 disables the noise)
  return cfg


def balance_spec(cfg: ml_collections.ConfigDict | Mapping | None) -> BalanceSpec:
  """Validate `model.balance` (ValueError naming the field); None or absent means method 'none'."""
  if cfg is None:
    return BalanceSpec()
  cfg = dict(cfg)
  unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(BalanceSpec)})
  if unknown:
    raise ValueError(f"model.balance has unknown fields {unknown}; known: method, alpha, ge_scale")
  spec = BalanceSpec(**{k: (str(v) if k == "method" else float(v)) for k, v in cfg.items()})
  if spec.method not in METHODS:
    raise ValueError(f"model.balance.method={spec.method!r}; choose from {METHODS}")
  if spec.alpha < 0:
    raise ValueError(f"model.balance.alpha={spec.alpha} must be >= 0")
  if spec.ge_scale < 0:
    raise ValueError(f"model.balance.ge_scale={spec.ge_scale} must be >= 0")
  return spec


@jax.custom_vjp
def modulate_gradient(x: Float[Array, "b w"], coeff: Float[Array, ""], noise_std: Float[Array, ""],
                      key: jax.Array) -> Float[Array, "b w"]:
  """Identity forward; backward g -> coeff * g + N(0, (noise_std * std(g))^2) with noise drawn from `key`."""
  del coeff, noise_std, key
  return x


def _modulate_fwd(x, coeff, noise_std, key):
  return x, (coeff, noise_std, key)


def _modulate_bwd(res, g):
  coeff, noise_std, key = res
  g32 = g.astype(jnp.float32)
  std = noise_std * (jnp.std(g32) + GE_EPS)
  noise = jnp.where(noise_std > 0, std * jax.random.normal(key, g.shape, jnp.float32), 0.0)
  return ((coeff * g32 + noise).astype(g.dtype), jnp.zeros_like(coeff), jnp.zeros_like(noise_std), None)


modulate_gradient.defvjp(_modulate_fwd, _modulate_bwd)


def true_class_confidence(logits: Float[Array, "b d k"], targets: Int[Array, "b d"]) -> Float[Array, " b"]:
  """Per-sample softmax probability of the true class, averaged over positions (no gradient)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0], axis=-1)


def ogm_coefficients(scores: Mapping[str, Float[Array, ""]], alpha: float) -> dict[str, Float[Array, ""]]:
  """k_m = 1 - tanh(alpha * relu(rho_m - 1)), rho_m = s_m / mean of the other modalities' scores."""
  names = tuple(scores)
  if len(names) < 2:
    return {m: jnp.ones((), jnp.float32) for m in names}
  stacked = jnp.stack([jnp.asarray(scores[m], jnp.float32) for m in names])
  others = (jnp.sum(stacked) - stacked) / (len(names) - 1)
  ratio = stacked / jnp.maximum(others, 1e-12)
  coeffs = 1.0 - jnp.tanh(alpha * jax.nn.relu(ratio - 1.0))
  return {m: jax.lax.stop_gradient(coeffs[i]) for i, m in enumerate(names)}


def modality_scores(confidence: Mapping[str, Float[Array, " b"]], present: Mapping[str, Bool[Array, " b"]],
                    weight: Float[Array, " b"]) -> dict[str, Float[Array, ""]]:
  """Each modality's weighted mean confidence over the samples that carry it (0 when none do)."""
  out = {}
  for m, conf in confidence.items():
    w = weight * present[m].astype(jnp.float32)
    out[m] = jnp.sum(conf * w) / jnp.maximum(jnp.sum(w), 1e-12)
  return out


def apply_ogm_ge(features: Mapping[str, Float[Array, "b w"]], coeffs: Mapping[str, Float[Array, ""]],
                 spec: BalanceSpec, key: jax.Array) -> dict[str, Float[Array, "b w"]]:
  """Each modality's features through `modulate_gradient` with its coefficient and its own noise key."""
  keys = jax.random.split(key, len(features))
  noise = jnp.asarray(spec.ge_scale, jnp.float32)
  return {m: modulate_gradient(x, coeffs[m], noise, keys[i]) for i, (m, x) in enumerate(features.items())}
