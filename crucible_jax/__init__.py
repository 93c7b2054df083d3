"""crucible_jax: multimodal (image, text, audio, video) training in JAX/Flax, sharded over a device mesh."""

from typing import Any

__all__ = ["load_experiment"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  """`load_experiment` on first use: importing a subpackage (models) does not load the config and data registries."""
  if name == "load_experiment":
    from crucible_jax.config import load_experiment  # pylint: disable=g-import-not-at-top
    return load_experiment
  raise AttributeError(f"module 'crucible_jax' has no attribute {name!r}")
