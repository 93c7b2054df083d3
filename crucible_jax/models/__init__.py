"""The multimodal Linen model: encoders, cross-modal attention, adaptive fusion and task heads."""

from crucible_jax.models.build import build_model, example_batch
from crucible_jax.models.crucible import ALL_HEADS, CrucibleModel, ModelConfig
from crucible_jax.models.defaults import default_model_config

__all__ = ["ALL_HEADS", "CrucibleModel", "ModelConfig", "build_model", "default_model_config", "example_batch"]
