"""crucible_jax: multimodal (image, text, audio, video) training in JAX/Flax, sharded over a device mesh."""

from crucible_jax.config import load_experiment

__all__ = ["load_experiment"]
__version__ = "0.1.0"
