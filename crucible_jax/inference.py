"""A trained model without the Trainer: config + final params from a workdir or a params directory, and embedding.

Nothing here opens metrics or TensorBoard files, builds a train iterator or restores optimizer state, and nothing
is written: `crucible embed`, `crucible export` and `crucible index` read a run through it.

A *params directory* holds `config.json` (a resolved experiment config) and `params/` (an orbax PyTree of the
model's params); `save_params_dir` writes one. A *workdir* is what `crucible train` writes; its newest intact
checkpoint (checksums verified, as a resume does) is read.
"""

import dataclasses
import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import Array, Float

from crucible_jax.config import ConfigError, validate
from crucible_jax.data.schema import example_batch
from crucible_jax.common_types import MODALITIES, present_key
from crucible_jax.models import lora
from crucible_jax.parallel import mesh as mesh_lib
from crucible_jax.train.checkpoint import CONFIG_FILE, PARAMS_DIR, final_state_dir
from crucible_jax.train.setup import Experiment


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples experiment configs use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The validated, locked config saved in a workdir or params directory."""
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: {path} is neither a crucible workdir nor a params directory")
  try:
    raw = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file} is not valid JSON: {e}") from e
  config = ml_collections.ConfigDict(_tuples(raw))
  validate(config)
  config.lock()
  return config


def _restore_tree(path: pathlib.Path, abstract: Any) -> Any:
  """The PyTree at `path` (only the leaves of `abstract`, on its shardings); ValueError names missing keys."""
  saved = ocp.StandardCheckpointHandler().metadata(path)
  saved = flax.traverse_util.flatten_dict(dict(getattr(saved, "tree", saved)), sep="/")
  wanted = flax.traverse_util.flatten_dict(abstract, sep="/")
  missing = sorted(k for k in wanted if k not in saved)
  mismatched = sorted(k for k in wanted if k in saved and tuple(saved[k].shape) != tuple(wanted[k].shape))
  if missing or mismatched:
    raise ValueError(f"{path} does not hold this model's params: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, shape-mismatched {mismatched[:8]}")
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(path, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))


@dataclasses.dataclass
class InferenceModel:
  """A config, its model and params on a mesh; `embed` maps raw batches to normalised joint-space vectors."""

  config: ml_collections.ConfigDict
  experiment: Experiment
  params: Any

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.config.model.modalities)

  def empty_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A zero batch in the schema with every modality marked absent."""
    batch = example_batch(self.config.data, batch_size)
    for m in MODALITIES:
      batch[present_key(m)][:] = False
    batch["weight"][:] = 1.0
    return batch

  @functools.cached_property
  def _embed_fn(self):
    model, rules = self.experiment.model, self.experiment.rules

    def embed(params: Any, batch: dict) -> dict[str, jax.Array]:
      with nn.logical_axis_rules(rules):
        out = model.apply({"params": params}, batch, train=False, heads=("embed",), route=False)
      return {m: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
              for m, v in out["embeddings"].items()}

    return jax.jit(embed)

  def embed(self, modality: str, inputs: Mapping[str, np.ndarray]) -> Float[np.ndarray, "batch joint"]:
    """L2-normalised embeddings of one modality; `inputs` are that modality's schema keys (e.g. audio, audio_len)."""
    if modality not in self.modalities:
      raise ValueError(f"this model has no {modality!r} encoder; it encodes {self.modalities}")
    size = len(next(iter(inputs.values())))
    batch = self.empty_batch(size)
    for key, value in inputs.items():
      if key not in batch:
        raise ValueError(f"{key!r} is not a batch key; expected keys of {modality!r}")
      batch[key] = np.asarray(value, batch[key].dtype).reshape(batch[key].shape)
    batch[present_key(modality)][:] = True
    with jax.set_mesh(self.experiment.mesh):
      return np.asarray(self._embed_fn(self.params, batch)[modality])


def _abstract_params(experiment: Experiment) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      experiment.abstract_params, experiment.param_shardings)


def load(path: str | pathlib.Path, devices: Sequence[jax.Device] | None = None, *,
         config: ml_collections.ConfigDict | None = None, mesh: jax.sharding.Mesh | None = None) -> InferenceModel:
  """Config and final params of a workdir (newest checkpoint) or a params directory.

  By default the saved config on a data mesh of `devices` (default: this process's first device), batches any
  multiple of it. `config` (validated, e.g. `crucible eval --config`) replaces the saved one; `mesh` replaces the
  data mesh and keeps the config's batch sizes.
  """
  path = pathlib.Path(path)
  config = read_config(path) if config is None else config.copy_and_resolve_references()
  if mesh is None:
    mesh = mesh_lib.build_mesh({"data": -1}, devices or jax.local_devices()[:1])
    with config.unlocked():
      config.batch_size = mesh_lib.num_data_shards(mesh)  # inference batches are any multiple of the mesh
  experiment = Experiment(config, mesh)
  abstract = _abstract_params(experiment)
  if (path / PARAMS_DIR).is_dir():
    params = _restore_tree((path / PARAMS_DIR).absolute(), abstract)
  else:
    params = _restore_tree(final_state_dir(path), {"params": abstract})["params"]
  if experiment.adapters:  # LoRA: fold the adapters into the kernels; what is returned is a plain model
    config = without_adapters(config)
    merged = lora.merge(params, experiment.adapters)
    experiment = Experiment(config, mesh)
    params = jax.device_put(merged, experiment.param_shardings)
  return InferenceModel(config, experiment, params)


def without_adapters(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A locked copy of `config` whose stages have no `lora` (the model it builds has no adapters)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for stage in config.stages.values():
      if "lora" in stage:
        del stage["lora"]
  config.lock()
  return config


def save_params_dir(out: str | pathlib.Path, config: ml_collections.ConfigDict, params: Any) -> pathlib.Path:
  """Write `config.json` and `params/` to `out` (a new or empty directory); returns it."""
  out = pathlib.Path(out).absolute()
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as writer:
    writer.save(out / PARAMS_DIR, params)
  (out / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  return out
