"""`crucible bench scaling`: per-device memory and communication of dp / fsdp / fsdp_tp on 1-8 devices, plus an
analytic (not measured) projection of data-parallel scaling efficiency on 8 / 16 / 32 A100s.

Measured, from compiled programs of the first stage's train step (nothing is executed): per-device bytes of
params and optimizer state (from their shardings), `memory_analysis()` (arguments, outputs, temporaries ≈
activations and gradients), and collective bytes each device sends per step (`bench.comm.traffic`).
Projected: step time = compute (the program's FLOPs at an assumed A100 MFU) + a hierarchical ring all-reduce of
the gradients (NVLink inside a node of 8, a per-GPU network link across nodes); the assumptions go in the JSON.
Per compression method the same model runs with the gradient bytes shrunk by the method's measured
`bytes_ratio_vs_none`, for an NVLink network and for 100 Gb/s Ethernet between hosts.
"""

import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from crucible_jax.bench import comm
from crucible_jax.bench.common import compiled_flops, device_info
from crucible_jax.parallel import compression
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.train.setup import Experiment

LAYOUTS: dict[str, Callable[[int], dict[str, int]]] = {
    "dp": lambda n: dict(data=n, fsdp=1, tensor=1),
    "fsdp": lambda n: dict(data=1, fsdp=n, tensor=1),
    "fsdp_tp": lambda n: dict(data=1, fsdp=max(n // 2, 1), tensor=min(n, 2)),
}
DEVICE_COUNTS = (1, 2, 4, 8)
CLAIMS = {8: 0.92, 16: 0.89, 32: 0.85}  # the original article's linear-speedup ratios
ASSUMPTIONS = dict(
    a100_peak_flops=312e12,  # dense bf16 tensor-core peak, FLOP/s (datasheet)
    mfu=0.4,  # assumed model FLOPs utilisation of the compute part
    nvlink_bytes_per_s=300e9,  # per-GPU NVLink bandwidth per direction (600 GB/s bidirectional), inside a node
    inter_node_bytes_per_s=(25e9, 50e9),  # per-GPU network bandwidth across nodes (200 / 400 Gb/s NICs)
    gpus_per_node=8,
    gradient_bytes_per_param=4,  # float32 gradient all-reduce (2 with bf16 compression)
    latency_s=10e-6,  # per ring hop
)
# Per-GPU bandwidth between nodes of the per-method rows: an NVLink network across nodes, or one 100 Gb/s
# Ethernet NIC per host of 8 GPUs (12.5 GB/s shared by 8).
LINKS = {"nvlink_300GB/s": 300e9, "ethernet_100Gb/s_per_host": 100e9 / 8 / 8}


def _bytes_per_device(tree: Any) -> int:
  """Largest per-device footprint of a pytree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shard)) * leaf.dtype.itemsize
  return total


def layout_setup(config: ml_collections.ConfigDict, layout: str, n: int) -> tuple[Experiment, Any, Any]:
  """(experiment, abstract sharded state, state shardings) of the first stage for `layout` on the first `n` devices."""
  cfg = config.copy_and_resolve_references()
  axes = LAYOUTS[layout](n)
  with cfg.unlocked():
    cfg.mesh.update(axes)
    cfg.sharding.layout = layout if n > 1 else "dp"
    cfg.compression.method = "none"
    cfg.stage_order = (cfg.stage_order[0],)
  experiment = Experiment(cfg, build_mesh(axes, jax.devices()[:n]))
  tx, *_ = experiment.stage_parts(experiment.plans[0])
  abstract, _, shardings = experiment.state_layout(tx)
  return experiment, abstract, shardings


def state_bytes(abstract: Any) -> dict[str, int]:
  """Per-device bytes of params and optimizer state of an abstract sharded state."""
  return {"params_bytes": _bytes_per_device(abstract.params), "opt_state_bytes": _bytes_per_device(abstract.opt_state)}


def measure(config: ml_collections.ConfigDict, layout: str, n: int) -> dict[str, Any]:
  """Compile the first stage's step for `layout` on the first `n` devices; memory, traffic and FLOPs."""
  experiment, abstract, shardings = layout_setup(config, layout, n)
  batch = experiment.abstract_batch()
  start = time.perf_counter()
  with jax.set_mesh(experiment.mesh):
    step = experiment.train_step(experiment.plans[0], shardings)
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
  print(f"bench scaling: {layout} on {n} devices compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr,
        flush=True)
  memory = compiled.memory_analysis()
  mem = {k: int(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  return {
      "mesh": dict(experiment.mesh.shape), **state_bytes(abstract), "memory_analysis": mem,
      "activation_and_temp_bytes": mem["temp"], "flops": compiled_flops(compiled),
      "comm": comm.traffic(compiled.as_text(), n),
      "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
  }


def allreduce_s(grad_bytes: float, n: int, inter_bw: float, a: dict[str, Any]) -> float:
  """Hierarchical ring all-reduce time: reduce-scatter/all-gather over NVLink, shards all-reduced across nodes."""
  if n <= 1:
    return 0.0
  local = min(n, a["gpus_per_node"])
  nodes = n // local
  t = 2 * (local - 1) / local * grad_bytes / a["nvlink_bytes_per_s"] + 2 * (local - 1) * a["latency_s"]
  if nodes > 1:
    t += 2 * (nodes - 1) / nodes * (grad_bytes / local) / inter_bw + 2 * (nodes - 1) * a["latency_s"]
  return t


def project(num_params: int, flops_per_step: float, a: dict[str, Any] = ASSUMPTIONS) -> dict[str, Any]:
  """Weak-scaling efficiency T(1)/T(N) with and without compute/communication overlap, per inter-node bandwidth."""
  compute_s = flops_per_step / (a["a100_peak_flops"] * a["mfu"])
  grad_bytes = num_params * a["gradient_bytes_per_param"]
  out = {"compute_s_per_step": compute_s, "gradient_bytes": grad_bytes, "by_inter_node_bandwidth": {}}
  for bw in a["inter_node_bytes_per_s"]:
    rows = {}
    for n, claim in CLAIMS.items():
      comm_s = allreduce_s(grad_bytes, n, bw, a)
      rows[str(n)] = {"allreduce_s": comm_s, "efficiency_no_overlap": compute_s / (compute_s + comm_s),
                      "efficiency_full_overlap": compute_s / max(compute_s, comm_s), "claimed": claim}
    out["by_inter_node_bandwidth"][f"{bw / 1e9:.0f}GB/s"] = rows
  return out


def project_methods(none_gradient_bytes: float, flops_per_step: float, bytes_ratio_vs_none: dict[str, float],
                    a: dict[str, Any] = ASSUMPTIONS) -> dict[str, Any]:
  """Per compression method and link: efficiency at 8/16/32 GPUs (no overlap) when the uncompressed run's gradient
  all-reduce (`none_gradient_bytes`, measured) shrinks by the method's measured `bytes_ratio_vs_none`."""
  compute_s = flops_per_step / (a["a100_peak_flops"] * a["mfu"])
  out: dict[str, Any] = {}
  for method, ratio in bytes_ratio_vs_none.items():
    grad_bytes = none_gradient_bytes / ratio
    out[method] = {"bytes_ratio_vs_none": ratio, "gradient_bytes": grad_bytes}
    for link, bw in LINKS.items():
      out[method][link] = {str(n): compute_s / (compute_s + allreduce_s(grad_bytes, n, bw, a)) for n in CLAIMS}
  return out


def measured_compression(config: ml_collections.ConfigDict, none_wire_bytes: float | None = None) -> dict[str, Any]:
  """Each compression method's wire bytes and `bytes_ratio_vs_none` from the first stage's programs compiled on all
  devices ('none' given as `none_wire_bytes` when already measured), and the uncompressed gradients as the payload
  of one all-reduce (wire bytes / (2(n-1)/n))."""
  n = jax.device_count()
  wire = {m: comm.compile_method(config, m, 1)["traffic"]["gradient_bytes"]
          if m != "none" or none_wire_bytes is None else none_wire_bytes for m in compression.METHODS}
  return {"gradient_wire_bytes_per_device": wire, "ratios": {m: wire["none"] / max(b, 1.0) for m, b in wire.items()},
          "none_allreduce_payload_bytes": wire["none"] / (2 * (n - 1) / n)}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Memory/communication table over layouts × device counts, FSDP memory fraction, and the A100 projection."""
  counts = [n for n in DEVICE_COUNTS if n <= jax.device_count()]
  table: dict[str, dict[str, Any]] = {}
  single = measure(config, "dp", 1)
  for layout in LAYOUTS:
    table[layout] = {"1": single}
    for n in counts[1:]:
      table[layout][str(n)] = measure(config, layout, n)
  replicated = single["params_bytes"] + single["opt_state_bytes"]
  top = counts[-1]
  fsdp = table["fsdp"][str(top)]
  fraction = (fsdp["params_bytes"] + fsdp["opt_state_bytes"]) / replicated
  dp_all = table["dp"].get(str(jax.device_count()))  # dp over every device: the uncompressed program, compiled
  measured = (measured_compression(config, dp_all["comm"]["gradient_bytes"] if dp_all else None)
              if jax.device_count() > 1 else None)
  return {
      **device_info(), "stage": config.stage_order[0], "batch_size": config.batch_size,
      "num_params": single["num_params"], "layouts": table,
      "fsdp_memory_fraction": {"devices": top, "fraction": fraction, "ideal": 1 / top,
                               "target_max": 1 / top + 0.1, "meets_target": fraction <= 1 / top + 0.1},
      "projection_a100": {"label": "ANALYTIC PROJECTION, not a measurement", "assumptions": ASSUMPTIONS,
                          **project(single["num_params"], single["flops"])},
      "projection_a100_by_compression": {
          "label": "ANALYTIC PROJECTION (a model, not a measurement) from the measured bytes_ratio_vs_none",
          "links_bytes_per_s_per_gpu": LINKS, "measured_on": f"{jax.device_count()} devices, data-parallel",
          **({"measured": measured,
              "methods": project_methods(measured["none_allreduce_payload_bytes"], single["flops"],
                                         measured["ratios"])} if measured else {"methods": {}})},
      "notes": ["params/opt_state bytes: per device, from the shardings; temp = XLA temporaries (activations, "
                "gradients, workspace) from memory_analysis()",
                "comm: bytes each device sends per step (ring model) read from the compiled HLO",
                "projection: weak scaling, every GPU runs this batch; compute = FLOPs of the 1-device program at "
                "the assumed MFU; communication = one bucketed hierarchical ring all-reduce of the gradients",
                "projection_a100_by_compression: the same model with the all-reduce payload of the uncompressed "
                "run's measured gradient traffic (trained params only), divided by each method's "
                "bytes_ratio_vs_none; both measured from the first stage's compiled programs on all devices"],
  }
