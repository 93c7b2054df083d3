"""Run exported artifacts with jax and numpy only: no crucible model code, no Flax.

An export directory holds `manifest.json` and, per artifact, a serialized `jax.export.Exported` (`NAME.jax`, batch
dimension symbolic) and its params (`NAME.npz`, flat "a/b/c" keys). This module imports nothing from crucible_jax,
so an edge device (or a test) can load it by file path.
"""

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _bucket(size: int) -> int:
  """The power of two a batch of `size` is padded to (bounds how many shapes get compiled)."""
  return 1 << max(size - 1, 0).bit_length()


class Artifact:
  """One exported function: `artifact(inputs)` maps named numpy inputs (leading batch axis) to named outputs."""

  def __init__(self, directory: pathlib.Path, name: str, spec: Mapping[str, Any]):
    self.name, self.spec = name, spec
    self.exported = jax.export.deserialize(bytearray((directory / spec["file"]).read_bytes()))
    with np.load(directory / spec["params"]) as saved:
      self.params = {k: jax.device_put(saved[k]) for k in saved.files}
    self._call = jax.jit(self.exported.call)

  @property
  def inputs(self) -> dict[str, dict[str, Any]]:
    return self.spec["inputs"]

  def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs for a batch; ValueError naming the key if an input is missing or mis-shaped."""
    missing = sorted(set(self.inputs) - set(inputs))
    if missing:
      raise ValueError(f"artifact {self.name!r} needs inputs {missing}")
    arrays, size = {}, None
    for key, want in self.inputs.items():
      value = np.asarray(inputs[key], want["dtype"])
      if value.ndim != len(want["shape"]) or list(value.shape[1:]) != want["shape"][1:]:
        raise ValueError(f"input {key!r} of {self.name!r} has shape {value.shape}, expected {want['shape']} "
                         "(None = batch)")
      size = len(value) if size is None else size
      if len(value) != size:
        raise ValueError(f"inputs of {self.name!r} disagree on the batch size")
      arrays[key] = value
    padded = _bucket(size)
    arrays = {k: np.concatenate([v, np.zeros((padded - size, *v.shape[1:]), v.dtype)]) if padded > size else v
              for k, v in arrays.items()}
    out = self._call(self.params, arrays)
    return {k: np.asarray(v)[:size] for k, v in out.items()}


class ExportDir:
  """The manifest and lazily loaded artifacts of an export directory."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    file = self.directory / MANIFEST
    if not file.is_file():
      raise FileNotFoundError(f"{file} not found: {directory} is not a crucible export directory")
    self.manifest = json.loads(file.read_text())
    if self.manifest.get("format") != FORMAT_VERSION:
      raise ValueError(f"{file}: export format {self.manifest.get('format')!r}, this loader reads {FORMAT_VERSION}")
    self._loaded: dict[str, Artifact] = {}

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.manifest["modalities"])

  def artifact(self, name: str) -> Artifact:
    """The artifact `name` (e.g. "encoder_image", "fusion", "head_fused")."""
    if name not in self.manifest["artifacts"]:
      raise KeyError(f"no artifact {name!r} in {self.directory}; it has {sorted(self.manifest['artifacts'])}")
    if name not in self._loaded:
      self._loaded[name] = Artifact(self.directory, name, self.manifest["artifacts"][name])
    return self._loaded[name]

  def embed(self, modality: str, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """L2-normalised joint-space embeddings of one modality's preprocessed inputs."""
    if modality not in self.modalities:
      raise ValueError(f"this export has no {modality!r} encoder; it encodes {self.modalities}")
    return self.artifact(f"encoder_{modality}")(inputs)["embedding"]
