"""`crucible bench comm`: bytes each gradient-compression method puts on the wire per step, and what it costs in loss.

For each measured stage and method the stage's train step is compiled on a pure data-parallel mesh over all
devices; every collective in the compiled HLO is read with its result size and group size, and converted to bytes
each device sends under the usual ring algorithms (all-reduce 2(n-1)/n × size, all-gather and all-to-all (n-1)/n ×
result, reduce-scatter (n-1) × result, collective-permute 1 × result). `gradient_bytes` is that sum over every
collective except forward-pass activation traffic (ops traced under `jvp(` but not `transpose(`), reported separately
as `activation_bytes`. The headline, `bytes_ratio_vs_none`, divides the uncompressed ('none', GSPMD) program's
gradient bytes for the same stage by the method's. Then the same short DigitWorld run of the stage (same data order
and seeds) gives each method's loss.
"""

import dataclasses
import re
import sys
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from crucible_jax.bench.common import device_info
from crucible_jax.parallel import compression
from crucible_jax.parallel.distributed import CPU_COLLECTIVE_PATIENCE, apply_xla_flags
from crucible_jax.parallel.mesh import data_axes
from crucible_jax.train.setup import Experiment

_OP = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
                 r"collective-permute)(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([0-9,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<used>[^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[0-9,]*)\}")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
_RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
                "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: float(n - 1),
                "collective-permute": lambda n: 1.0}
STEPS = 80  # training steps per method and stage
GOALS = {"bf16": 1.9, "int8": 3.5, "powersgd": 8.0}  # minimum bytes_ratio_vs_none (issue 28)
LOSS_TOLERANCE = 0.02  # largest |final loss / none's - 1| (issue 28)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program: kind, result bytes, participants, element types, traced op name."""

  op: str
  result_bytes: int
  group_size: int
  dtypes: tuple[str, ...]
  op_name: str

  @property
  def wire_bytes(self) -> float:
    """Bytes one device sends for it under the ring algorithm."""
    return self.result_bytes * _RING_FACTOR[self.op](self.group_size) if self.group_size > 1 else 0.0

  @property
  def is_activation(self) -> bool:
    """Forward-pass traffic (e.g. a gathered activation), as opposed to gradient / loss reductions."""
    return "jvp(" in self.op_name and "transpose(" not in self.op_name


def _group_size(line: str, num_devices: int) -> int:
  if match := _MESH_GROUPS.search(line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", match["axes"]))
    used = re.findall(r"'(\w+)'", match["used"])
    return int(np.prod([int(sizes[a]) for a in used])) if used else num_devices
  if match := _IOTA_GROUPS.search(line):
    return int(match["size"])
  if match := _LIST_GROUPS.search(line):
    return len([d for d in match["first"].split(",") if d])
  return num_devices  # replica_groups={} means every device


def parse_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective of compiled HLO text (async start/done pairs counted once, at -done)."""
  out, starts = [], {}
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if match is None:
      continue
    name = _OP_NAME.search(line)
    if match["suffix"] == "-start":  # the -done line carries no replica groups; remember them here
      starts[line.split("=")[0].strip()] = (_group_size(line, num_devices), name["name"] if name else "")
      continue
    group, op_name = _group_size(line, num_devices), name["name"] if name else ""
    if match["suffix"] == "-done":
      operand = re.search(r"-done\((%?[\w.\-]+)", line)
      group, op_name = starts.get(operand[1] if operand else "", (group, op_name))
    arrays = _ARRAY.findall(match["shape"])
    size = sum(compression._array_bytes(dtype, dims) for dtype, dims in arrays)
    out.append(Collective(match["op"], size, group, tuple(sorted({d for d, _ in arrays})), op_name))
  return out


def traffic(hlo_text: str, num_devices: int) -> dict[str, Any]:
  """Per-step communication of a compiled program: wire bytes per device split into gradient and activation."""
  ops = parse_collectives(hlo_text, num_devices)
  by_op: dict[str, float] = {}
  for c in ops:
    by_op[c.op] = by_op.get(c.op, 0.0) + c.wire_bytes
  async_pairs = len(re.findall(r"(?:all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)-start\(",
                               hlo_text))
  return {
      "gradient_bytes": sum(c.wire_bytes for c in ops if not c.is_activation),
      "activation_bytes": sum(c.wire_bytes for c in ops if c.is_activation),
      "wire_bytes_by_op": by_op,
      "result_bytes_by_op": compression.collective_bytes(hlo_text),
      "gradient_dtypes": sorted({d for c in ops if not c.is_activation and c.result_bytes > 64 for d in c.dtypes}),
      "num_collectives": len(ops),
      "async_start_done_pairs": async_pairs,
  }


def tolerate_slow_cpu_devices() -> bool:
  """Set `CPU_COLLECTIVE_PATIENCE` unless the backend is already up (then XLA's defaults stand); True if set."""
  try:
    apply_xla_flags(CPU_COLLECTIVE_PATIENCE)
  except RuntimeError:
    return False
  return True


def default_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The last stage that freezes nothing (a curriculum's widest) and the first that freezes some params, if any."""
  order = tuple(config.stage_order)
  open_ = [name for name in order if not tuple(config.stages[name].frozen)]
  frozen = [name for name in order if tuple(config.stages[name].frozen)]
  return tuple(dict.fromkeys(open_[-1:] + frozen[:1])) or order[:1]


def method_config(config: ml_collections.ConfigDict, method: str, steps: int,
                  stage: str | None = None) -> ml_collections.ConfigDict:
  """`config` on a pure data-parallel mesh over all devices, `stage` (default: the first) alone, with compression
  `method`."""
  cfg = config.copy_and_resolve_references()
  stage = stage or cfg.stage_order[0]
  if stage not in cfg.stages:
    raise ValueError(f"bench comm: unknown stage {stage!r}; the config has {tuple(cfg.stages)}")
  with cfg.unlocked():
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.sharding.layout = "dp"
    cfg.compression.method = method
    cfg.stage_order = (stage,)
    cfg.stages[stage].update(steps=max(steps, 1), warmup=min(cfg.stages[stage].warmup, max(steps, 1)), carry=())
  return cfg


def compile_method(config: ml_collections.ConfigDict, method: str, steps: int = STEPS,
                   stage: str | None = None) -> dict[str, Any]:
  """Experiment, initial state, compiled step and HLO traffic of one compression method on one stage."""
  experiment = Experiment(method_config(config, method, steps, stage))
  abstract, make, shardings, step = experiment.stage_program(experiment.plans[0])
  batch = experiment.abstract_batch()
  start = time.perf_counter()
  with jax.set_mesh(experiment.mesh):
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
  return {"experiment": experiment, "make": make, "shardings": shardings, "compiled": compiled,
          "compile_s": time.perf_counter() - start,
          "traffic": traffic(compiled.as_text(), experiment.mesh.devices.size)}


def train_losses(parts: dict[str, Any], steps: int) -> list[float]:
  """Loss of every step of a short run of the compiled step on DigitWorld (fixed data order and seeds)."""
  from crucible_jax.data import loader, registry  # deferred: the data stack is only needed to train
  experiment, config = parts["experiment"], parts["experiment"].config
  state = experiment.new_state(parts["make"], parts["shardings"],
                               experiment.init_params(jax.random.key(config.seed)))
  iterator = registry.make_train_iterator(config.data, global_batch=config.batch_size, seed=config.seed)
  rng, losses = jax.random.key(config.seed), []
  with jax.set_mesh(experiment.mesh):
    for i in range(steps):
      batch = loader.to_global_batch(next(iterator), experiment.batch_sharding)
      state, metrics = parts["compiled"](state, batch, jax.random.fold_in(rng, i))
      losses.append(metrics["loss"])
  return [float(x) for x in jax.device_get(losses)]


def backend_bf16_collectives(mesh: jax.sharding.Mesh) -> dict[str, dict[str, str]]:
  """Element type on the wire of each collective of a bfloat16 operand, from this backend's compiled HLO."""
  axes, n = data_axes(), mesh.devices.size
  bits = lambda v: jax.lax.bitcast_convert_type(v.astype(jnp.bfloat16), jnp.uint16)
  programs = {
      "psum(bf16)": lambda v: jax.lax.psum(v.astype(jnp.bfloat16), axes),
      "psum_scatter(bf16)": lambda v: jax.lax.psum_scatter(v.astype(jnp.bfloat16), axes, tiled=True),
      "all_to_all(bf16)": lambda v: jax.lax.all_to_all(v.astype(jnp.bfloat16).reshape(n, -1), axes, 0, 0, tiled=True),
      "all_gather(bf16)": lambda v: jax.lax.all_gather(v.astype(jnp.bfloat16), axes, tiled=True),
      "all_to_all(bf16 bits as uint16)": lambda v: jax.lax.all_to_all(bits(v).reshape(n, -1), axes, 0, 0, tiled=True),
      "all_gather(bf16 bits as uint16)": lambda v: jax.lax.all_gather(bits(v), axes, tiled=True),
  }
  x = jax.ShapeDtypeStruct((n * 256,), jnp.float32, sharding=NamedSharding(mesh, P(axes)))
  out = {}
  for name, fn in programs.items():
    hlo = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(axes), out_specs=P(axes))).lower(x).compile().as_text()
    line = next(line.strip() for line in hlo.splitlines() if _OP.search(line))
    out[name] = {"wire_dtype": ",".join(parse_collectives(line, n)[0].dtypes), "hlo": line[:160]}
  return out


def measure_stage(config: ml_collections.ConfigDict, stage: str, methods: Iterable[str],
                  steps: int) -> dict[str, Any]:
  """Bytes on the wire and final loss of each method on one stage, with ratios against its 'none' run."""
  report: dict[str, Any] = {"methods": {}}
  for method in methods:
    parts = compile_method(config, method, steps, stage)
    experiment = parts["experiment"]
    entry = {**parts["traffic"], "compile_s": parts["compile_s"]}
    if steps > 0:
      start = time.perf_counter()
      losses = train_losses(parts, steps)
      entry.update(final_loss=float(np.mean(losses[-10:])), last_loss=losses[-1], first_loss=losses[0],
                   loss_every_10=losses[::10], train_s=time.perf_counter() - start)
    report["methods"][method] = entry
    print(f"bench comm: {stage}/{method}: compile {entry['compile_s']:.0f} s, gradient bytes "
          f"{entry['gradient_bytes']:,.0f}" + (f", final loss {entry['final_loss']:.4f} ({entry['train_s']:.0f} s)"
                                              if steps > 0 else ""), file=sys.stderr, flush=True)
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(experiment.abstract_params)]
    report["params"] = sum(sizes)
    trained = experiment.trained(experiment.plans[0])
    if trained is not None:
      report["trained_params"] = sum(s for s, on in zip(sizes, jax.tree.leaves(trained)) if on)
      report["trained_f32_allreduce_bytes"] = 4 * report["trained_params"] * _RING_FACTOR["all-reduce"](
          experiment.mesh.devices.size)
  return compare_to_none(report)


def compare_to_none(stage: dict[str, Any]) -> dict[str, Any]:
  """Add each method's `bytes_ratio_vs_none`, `loss_rel_diff_vs_none`, `meets_bytes_goal` and (with losses)
  `meets_goal` to a stage's report, and, given `trained_f32_allreduce_bytes`, `bytes_ratio_vs_trained_f32_allreduce`."""
  base = stage["methods"].get("none")
  if base is None:
    return stage
  for method, entry in stage["methods"].items():
    entry["bytes_ratio_vs_none"] = base["gradient_bytes"] / max(entry["gradient_bytes"], 1.0)
    if "trained_f32_allreduce_bytes" in stage:
      entry["bytes_ratio_vs_trained_f32_allreduce"] = stage["trained_f32_allreduce_bytes"] / max(
          entry["gradient_bytes"], 1.0)
    if "final_loss" in entry:
      entry["loss_rel_diff_vs_none"] = (entry["final_loss"] - base["final_loss"]) / abs(base["final_loss"])
    if method in GOALS:
      entry["meets_bytes_goal"] = bool(entry["bytes_ratio_vs_none"] >= GOALS[method])
      if "loss_rel_diff_vs_none" in entry:  # with no steps run, the loss side is unmeasured
        entry["meets_goal"] = entry["meets_bytes_goal"] and abs(entry["loss_rel_diff_vs_none"]) <= LOSS_TOLERANCE
  return stage


def run(config: ml_collections.ConfigDict, *, methods: Iterable[str] = compression.METHODS, steps: int = STEPS,
        stages: Iterable[str] | None = None) -> dict[str, Any]:
  """Per stage (default `default_stages`), bytes on the wire and final loss of each method against 'none'."""
  patient = tolerate_slow_cpu_devices()
  if jax.device_count() < 2:
    raise ValueError("bench comm needs several devices to communicate; on CPU run it with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  stages = tuple(stages or default_stages(config))
  methods = tuple(methods)
  report: dict[str, Any] = {"stages": {stage: measure_stage(config, stage, methods, steps) for stage in stages}}
  experiment = Experiment(method_config(config, "none", 1, stages[0]))
  report.update(device_info(experiment.mesh), steps=steps, batch_size=config.batch_size, goals=GOALS,
                loss_tolerance=LOSS_TOLERANCE, cpu_collective_patience=CPU_COLLECTIVE_PATIENCE if patient else [],
                backend_bf16_collectives=backend_bf16_collectives(experiment.mesh))
  report["notes"] = [
      "gradient_bytes: bytes one device sends per step (ring model) for every collective except forward-pass "
      "activation traffic (activation_bytes); read from the compiled HLO",
      "bytes_ratio_vs_none: gradient_bytes of the uncompressed (GSPMD) program of the same stage over the method's; "
      "the compressed methods send only the trained_params (frozen, unused and routed-off params excluded)",
      "trained_f32_allreduce_bytes: one float32 ring all-reduce of the trained params' gradients (a formula, not a "
      "program); the uncompressed GSPMD program sends more where a param is used several times: XLA:CPU has no "
      "all-reduce reassociation pass, so each use's partial gradient is all-reduced before they are summed",
      "powersgd: low rank (bfloat16 P and Q) or one int8 bucket with error feedback per trained param: vectors "
      "int8, then the narrowest matrices move to int8 while the bytes stay within 1/compression.target_ratio of a "
      "float32 all-reduce of the trained gradients",
      "final_loss: mean of the last 10 step losses; every method sees the same batches and seeds",
      "backend_bf16_collectives: XLA:CPU compiles every bfloat16 collective in float32 (it moves the convert past "
      "the collective), so bf16 sends its bfloat16 bits as uint16 through an all-to-all + all-gather pair",
  ]
  return report
