"""An experiment's compiled pieces on a mesh — model, shardings, state, steps — with no data and no files.

The trainer and the benchmarks share it; it never imports the data pipeline, so `crucible bench step` runs on a
machine without grain or tfds.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import re

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from crucible_jax import tasks
from crucible_jax.data.schema import example_batch
from crucible_jax.models import ALL_HEADS, build_model, lora as lora_lib
from crucible_jax.parallel import compression, mesh as mesh_lib, precision, rules as rules_lib
from crucible_jax.train import grad_cache, objectives, optim, stages as stages_lib, step as step_lib
from crucible_jax.train.state import TrainState


class StageProgram(NamedTuple):
  """A stage's state layout and its jitted train step."""

  abstract: TrainState  # ShapeDtypeStructs with shardings
  make: Callable[[Any], TrainState]  # params -> fresh state
  shardings: TrainState
  train_step: Callable


class Experiment:
  """Model, mesh and sharded state/step builders of one validated config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh or mesh_lib.build_mesh(dict(config.mesh))
    mesh_lib.check_batch_divisible(config.batch_size, self.mesh)
    self.rules = rules_lib.rules_for(config.sharding.layout)
    self.policy = precision.Policy.from_config(config.get("precision", {}))
    if self.policy.needs_loss_scaling and config.compression.method != "none":
      raise ValueError(f"precision float16 needs loss scaling, which compression.method="
                       f"{config.compression.method!r} does not support; use bfloat16 or compression 'none'")
    # A copy: the caller's config stays what the user resolved (config.json compares it on resume).
    model_cfg = self.policy.apply_to_model_config(config.model.copy_and_resolve_references())
    if "routing" in model_cfg:  # each data shard routes its own block of the batch (gathers stay on-device)
      model_cfg.routing.groups = mesh_lib.num_data_shards(self.mesh)
    self.adapters = lora_lib.run_adapters(config.stages, config.stage_order)  # tower -> LoRA of some stage
    with model_cfg.unlocked():
      for tower, adapter in self.adapters.items():
        model_cfg[tower].lora = dataclasses.asdict(adapter)
    self.model = build_model(model_cfg)
    self.plans = stages_lib.plan_stages(config)
    self.replicated = rules_lib.replicated(self.mesh)
    self.batch_sharding = rules_lib.batch_sharding(self.mesh)
    boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    self.param_shardings = rules_lib.logical_to_shardings(boxed, self.mesh, self.rules)
    self.abstract_params = nn.meta.unbox(boxed)
    self._check_param_patterns()
    self._trained: dict[int, Any] = {}  # stage index -> `trained` mask (compressed runs)
    self._jitted_init = jax.jit(lambda r: nn.meta.unbox(self._init_boxed(r)), out_shardings=self.param_shardings,
                                compiler_options=self._compiler_options(step_lib.CPU_RUN_ONCE_COMPILER_OPTIONS))

  def _check_param_patterns(self) -> None:
    """Every `carry`/`frozen` regex must match a param path: a typo would silently train from scratch."""
    paths = list(flax.traverse_util.flatten_dict(self.abstract_params, sep="/"))
    for plan in self.plans:
      for field in ("carry", "frozen"):
        for pattern in plan.cfg.get(field, ()):
          if not any(re.search(pattern, path) for path in paths):
            raise ValueError(f"stages.{plan.name}.{field} pattern {pattern!r} matches no parameter; "
                             f"top-level params: {sorted(self.abstract_params)}")

  def example_batch(self, batch_size: int | None = None) -> dict:
    """Zeros in the batch schema's shapes."""
    return example_batch(self.config.data, batch_size or self.config.batch_size)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch's shapes and dtypes laid out on the mesh: what lowering a train step takes."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in self.example_batch().items()}

  def _init_boxed(self, rng: jax.Array) -> Any:
    with nn.logical_axis_rules(self.rules):
      return self.model.init({"params": rng, "routing": rng}, self.example_batch(), train=False,
                             heads=ALL_HEADS)["params"]

  def init_params(self, rng: jax.Array) -> Any:
    """Fresh params, born sharded on the mesh (one compile, never eager)."""
    with jax.set_mesh(self.mesh):
      return self._jitted_init(rng)

  def stage_parts(self, plan: stages_lib.StagePlan) -> tuple[optax.GradientTransformation, Any, tuple, Callable]:
    """Optimizer, frozen mask, model heads and objective of one stage."""
    groups = dict(self.config.optim.get("groups", {}))
    frozen_patterns = (*plan.cfg.frozen, *lora_lib.frozen_patterns(plan.cfg, self.adapters))
    tx = optim.build_optimizer(plan.cfg, self.config.optim, self.abstract_params, frozen_patterns)
    labels = optim.param_labels(self.abstract_params, frozen_patterns, groups)
    frozen = jax.tree.map(lambda label: label == optim.FROZEN, labels)
    # Contrastive losses run as a ring over the data axes (no global B×B matrix on a device), unless the whole
    # loss already runs per shard inside the compressed-gradient shard_map: there each shard gathers the embeddings.
    compressed = self.config.compression.method != "none"
    heads, objective = objectives.build_objective(dict(plan.cfg.objective), loss_kind=self.config.loss_kind,
                                                  mesh=None if compressed else self.mesh,
                                                  gather_axes=mesh_lib.data_axes() if compressed else (),
                                                  reference_glyphs=self._reference_glyphs)
    return tx, frozen, heads, objective

  @property
  def platform(self) -> str:
    """The mesh's device platform ("cpu", "gpu", "tpu"): what platform-specific compile and bench choices key on."""
    return self.mesh.devices.flat[0].platform

  def _compiler_options(self, cpu_options: dict[str, Any]) -> dict[str, Any] | None:
    """XLA compile options of one of this mesh's programs: `cpu_options` on a CPU mesh, none elsewhere."""
    return step_lib.compiler_options(cpu_options, self.platform)

  @functools.cached_property
  def _reference_glyphs(self) -> Any:
    """The data source's reference glyphs (`tasks.source_extras`) when `model.converter.image_target` asks for them,
    else None; built once, not per stage."""
    converter = self.config.model.get("converter")
    if converter is None or not converter.enabled or converter.get("image_target", "sample") != "reference":
      return None
    draw = tasks.source_extras(self.config.data.name).reference_glyphs
    if draw is None:
      raise ValueError(f"model.converter.image_target='reference': data.name={self.config.data.name!r} registers no "
                       f"reference glyphs (use 'sample')")
    return draw(self.config.data)

  def trained(self, plan: stages_lib.StagePlan) -> Any | None:
    """Which params the stage's compressed gradient reduction sends (`compression.trained_leaves`); None when
    uncompressed (GSPMD reduces only the gradients the program produces)."""
    if self.config.compression.method == "none":
      return None
    if plan.index not in self._trained:
      loss_fn = self._loss_fn(plan, self.stage_parts(plan))
      self._trained[plan.index] = compression.trained_leaves(loss_fn, self.abstract_params, self.abstract_batch(),
                                                             self.mesh)
    return self._trained[plan.index]

  def _compression_args(self, trained: Any | None) -> dict[str, Any]:
    comp_cfg = {**compression.default_compression_config(), **self.config.compression}  # older configs lack keys
    return dict(trained=trained, rank=comp_cfg["rank"], block=comp_cfg["block"], target_ratio=comp_cfg["target_ratio"])

  def state_layout(self, tx: optax.GradientTransformation,
                   trained: Any | None = None) -> tuple[TrainState, Callable, TrainState]:
    """(abstract state with shardings, `make(params) -> state`, state shardings); `trained` as `self.trained`."""
    method, comp_args = self.config.compression.method, self._compression_args(trained)

    def make(params: Any) -> TrainState:
      comp = compression.init_compression_state(params, method, self.mesh, **comp_args) if method != "none" else {}
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        comp_state=comp, skipped=jnp.zeros((), jnp.int32), tx=tx, loss_scale=self._loss_scale())

    with jax.set_mesh(self.mesh):
      abstract = jax.eval_shape(make, self.abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # a param outside an optax.multi_transform group (frozen)
    opt_shardings = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s,
                                          jax.eval_shape(tx.init, self.abstract_params), self.param_shardings,
                                          transform_non_params=lambda _: self.replicated, is_leaf=masked)
    comp_shardings = compression.compression_state_shardings(self.abstract_params, method, self.mesh, **comp_args)
    shardings = abstract.replace(step=self.replicated, params=self.param_shardings, opt_state=opt_shardings,
                                 comp_state=comp_shardings, skipped=self.replicated,
                                 loss_scale=jax.tree.map(lambda _: self.replicated, abstract.loss_scale))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, make, shardings

  def _loss_scale(self) -> precision.DynamicLossScale | None:
    """A fresh dynamic loss scale when compute is float16 (optional `config.loss_scale` = create() kwargs)."""
    if not self.policy.needs_loss_scaling:
      return None
    return precision.DynamicLossScale.create(**dict(self.config.get("loss_scale", None) or {}))

  def new_state(self, make: Callable, shardings: TrainState, params: Any) -> TrainState:
    """A fresh train state around `params`, laid out on the mesh."""
    with jax.set_mesh(self.mesh):
      return jax.jit(make, out_shardings=shardings,
                     compiler_options=self._compiler_options(step_lib.CPU_RUN_ONCE_COMPILER_OPTIONS))(params)

  def stage_program(self, plan: stages_lib.StagePlan) -> StageProgram:
    """The stage's state layout and jitted train step (nothing compiled yet)."""
    parts = self.stage_parts(plan)
    abstract, make, shardings = self.state_layout(parts[0], self.trained(plan))
    return StageProgram(abstract, make, shardings, self._jit_train_step(plan, parts, shardings))

  def train_step(self, plan: stages_lib.StagePlan, shardings: TrainState) -> Callable:
    """The stage's jitted `train_step(state, batch, rng)`, donating the state."""
    return self._jit_train_step(plan, self.stage_parts(plan), shardings)

  def _loss_fn(self, plan: stages_lib.StagePlan, parts: tuple) -> Callable:
    _, frozen, heads, objective = parts
    # Inside the compressed-gradient shard_map every array is local: no sharding constraints there.
    rules = self.rules if self.config.compression.method == "none" else ()
    return step_lib.make_loss_fn(self.model, objective, heads, frozen, rules, route=bool(plan.cfg.get("route", True)))

  def _jit_train_step(self, plan: stages_lib.StagePlan, parts: tuple, shardings: TrainState) -> Callable:
    method = self.config.compression.method
    loss_fn = self._loss_fn(plan, parts)
    grad_fn = None
    if method != "none":
      grad_fn = compression.make_compressed_value_and_grad(loss_fn, self.mesh, method,
                                                           **self._compression_args(self.trained(plan)))
    elif plan.accum_steps > 1:  # GradCache: the global batch's contrastive gradient, one chunk's activations alive
      rows = self.config.batch_size // mesh_lib.num_data_shards(self.mesh)
      if rows % plan.accum_steps:
        raise ValueError(f"stages.{plan.name}.accum_steps={plan.accum_steps} does not divide the {rows} rows per "
                         f"device (batch_size={self.config.batch_size} over {mesh_lib.num_data_shards(self.mesh)})")
      _, frozen, heads, objective = parts
      forward = step_lib.make_forward_fn(self.model, heads, frozen, self.rules, route=bool(plan.cfg.get("route", True)))
      grad_fn = grad_cache.make_grad_cache_fn(forward, objective, plan.accum_steps)
    batch_shardings = {key: self.batch_sharding for key in self.example_batch(1)}
    return jax.jit(step_lib.make_train_step(loss_fn, grad_fn=grad_fn),
                   in_shardings=(shardings, batch_shardings, self.replicated),
                   out_shardings=(shardings, self.replicated), donate_argnums=0,
                   compiler_options=self._compiler_options(step_lib.CPU_TRAIN_STEP_COMPILER_OPTIONS))

  def eval_step(self, heads: tuple[str, ...]) -> Callable:
    """Jitted `eval_step(params, batch) -> outputs`."""
    return jax.jit(step_lib.make_eval_step(self.model, heads, self.rules),
                   compiler_options=self._compiler_options(step_lib.CPU_STEP_COMPILER_OPTIONS))
