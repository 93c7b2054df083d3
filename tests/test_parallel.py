"""Mesh construction, logical sharding rules, distributed init and XLA overlap flags."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from crucible_jax.parallel import distributed, mesh as mesh_lib, rules


# ---------------------------------------------------------------------------------------------------- mesh


def test_build_mesh_fills_and_defaults():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": -1})
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert dict(mesh_lib.build_mesh({"tensor": -1}).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
  small = mesh_lib.build_mesh({"data": 2}, devices=jax.devices()[:2])
  assert dict(small.shape) == {"data": 2, "fsdp": 1, "tensor": 1}


def test_build_mesh_puts_tensor_innermost():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids.reshape(-1), np.arange(8))  # tensor neighbours are consecutive devices


@pytest.mark.parametrize("axes, message", [
    ({"data": 2, "fsdp": 2}, "multiply to 4"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 0, "fsdp": -1}, "positive"),
    ({"data": -2, "fsdp": -4}, "positive"),
    ({"data": 3, "fsdp": -1}, "cannot fill mesh axis 'fsdp'"),
    ({"model": 8}, "unknown mesh axis"),
])
def test_build_mesh_errors(axes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.build_mesh(axes)


@dataclasses.dataclass(frozen=True)
class FakeGpu:
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "fake"


def test_multi_host_grid_keeps_hosts_apart_only_along_data():
  devices = [FakeGpu(i, i // 4) for i in range(8)]
  grid = np.vectorize(lambda d: d.process_index)(mesh_lib.device_grid((2, 2, 2), devices))
  assert (grid[0] == 0).all() and (grid[1] == 1).all()
  grid = np.vectorize(lambda d: d.process_index)(mesh_lib.device_grid((1, 8, 1), devices))
  np.testing.assert_array_equal(grid.reshape(-1), [0] * 4 + [1] * 4)
  with pytest.raises(ValueError, match="process count"):
    mesh_lib.device_grid((1, 1, 8), devices)


def test_batch_divisibility():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 4})
  assert mesh_lib.data_axes() == ("data", "fsdp")
  mesh_lib.check_batch_divisible(16, mesh)
  with pytest.raises(ValueError, match=r"batch_size 12 .*8.*data=2, fsdp=4"):
    mesh_lib.check_batch_divisible(12, mesh)


# --------------------------------------------------------------------------------------------------- rules


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


class ToyModel(nn.Module):
  """Embedding, MLP, attention-shaped projection, norm and a class head, every param logically named."""

  @nn.compact
  def __call__(self, tokens):
    normal = nn.initializers.normal(0.02)
    table = self.param("embedding", _part(normal, ("vocab", "embed")), (64, 32))
    x = nn.with_logical_constraint(table[tokens], ("batch", "length", "embed"))
    h = nn.Dense(64, kernel_init=_part(normal, ("embed", "mlp")), bias_init=_part(nn.initializers.zeros, ("mlp",)))(x)
    x = x + nn.Dense(32, kernel_init=_part(normal, ("mlp", "embed")), use_bias=False)(nn.gelu(h))
    query = self.param("query", _part(normal, ("embed", "heads", "kv")), (32, 4, 8))
    q = jnp.einsum("ble,ehk->blhk", x, query)
    x = nn.LayerNorm(scale_init=_part(nn.initializers.ones, ("norm",)),
                     bias_init=_part(nn.initializers.zeros, ("norm",)))(x + q.reshape(x.shape))
    return nn.Dense(10, kernel_init=_part(normal, ("embed", "classes")), use_bias=False)(x)


TOKENS = jnp.zeros((8, 4), jnp.int32)


def _abstract_params():
  return jax.eval_shape(ToyModel().init, jax.random.key(0), TOKENS)


def _shardings(layout, mesh):
  return rules.logical_to_shardings(_abstract_params(), mesh, rules.rules_for(layout))


def test_layouts_differ_on_the_same_model():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  dp, fsdp, fsdp_tp = (_shardings(layout, mesh) for layout in ("dp", "fsdp", "fsdp_tp"))
  assert dp != fsdp != fsdp_tp != dp
  assert all(s.is_fully_replicated for s in jax.tree.leaves(dp))
  assert not any(s.is_fully_replicated for s in jax.tree.leaves(fsdp["params"]["Dense_0"]))
  fsdp, fsdp_tp = (jax.tree.map(lambda s: s.spec, tree) for tree in (fsdp, fsdp_tp))
  dense_0 = fsdp_tp["params"]["Dense_0"]["kernel"]
  assert fsdp["params"]["Dense_0"]["kernel"] == P("fsdp", None)
  assert dense_0 == P("fsdp", "tensor")
  assert fsdp_tp["params"]["query"] == P("fsdp", "tensor", None)
  assert fsdp_tp["params"]["LayerNorm_0"]["scale"] == P(None)


@pytest.fixture(scope="module")
def fsdp_init():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 4})
  layout = rules.rules_for("fsdp")
  shardings = rules.logical_to_shardings(_abstract_params(), mesh, layout)
  with jax.set_mesh(mesh), nn.logical_axis_rules(layout):
    params = jax.jit(ToyModel().init, out_shardings=shardings)(jax.random.key(0), TOKENS)
  return mesh, layout, params


def test_fsdp_params_are_born_split(fsdp_init):
  _, _, params = fsdp_init
  big = [box.value for box in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
         if box.value.size >= 1024]
  assert len(big) == 4
  for value in big:
    shard = value.sharding.shard_shape(value.shape)
    assert np.prod(shard) * 4 == value.size, (value.shape, shard)
    assert value.addressable_shards[0].data.shape == shard


def test_optimizer_state_follows_params(fsdp_init):
  mesh, layout, params = fsdp_init
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  shardings = rules.logical_to_shardings(opt_state, mesh, layout)
  param_shardings = rules.logical_to_shardings(params, mesh, layout)
  assert shardings[0].mu == param_shardings and shardings[0].nu == param_shardings
  assert shardings[0].count == rules.replicated(mesh)


def test_non_divisible_dims_fall_back_to_replicated():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 4})
  fsdp = rules.rules_for("fsdp")
  assert rules.spec_for_shape(("embed",), (30,), mesh, fsdp) == P(None)
  assert rules.spec_for_shape(("embed", "mlp"), (30, 8), mesh, fsdp) == P(None, "fsdp")  # fsdp freed for mlp
  assert rules.spec_for_shape(("batch", "embed"), (6, 8), mesh, fsdp) == P("data", "fsdp")
  assert rules.spec_for_shape(("batch", None), (16, 3), mesh, fsdp) == P(("data", "fsdp"), None)
  tiny = jax.eval_shape(lambda: {"w": nn.LogicallyPartitioned(jnp.zeros((6, 3)), ("embed", "mlp")),
                                 "step": jnp.zeros((), jnp.int32)})
  shardings = rules.logical_to_shardings(tiny, mesh, fsdp)
  assert shardings["w"].spec == P(None, None) and shardings["step"].spec == P()


def test_rule_errors_and_batch_sharding():
  mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match="'zero3'"):
    rules.rules_for("zero3")
  with pytest.raises(ValueError, match="'layers'"):
    rules.spec_for_shape(("layers", "embed"), (2, 8), mesh, rules.rules_for("fsdp"))
  assert rules.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert rules.replicated(mesh).spec == P()


# --------------------------------------------------------------------------------------------- distributed


@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: recorded.append((args, kwargs)))
  return recorded


def test_distributed_is_a_no_op_without_a_cluster(calls):
  assert distributed.initialize_distributed(env={}) is False
  assert distributed.initialize_distributed(env={"SLURM_NTASKS": "1"}) is False
  assert calls == []


def test_distributed_sources(calls):
  assert distributed.initialize_distributed("10.0.0.1:1234", 2, 1, env={"JAX_COORDINATOR_ADDRESS": "x"})
  env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.initialize_distributed(env=env)
  assert distributed.initialize_distributed(env={"SLURM_NTASKS": "16", "SLURM_PROCID": "5"})
  timeouts = {"initialization_timeout": distributed.INIT_TIMEOUT_S,
              "heartbeat_timeout_seconds": distributed.HEARTBEAT_TIMEOUT_S}
  assert calls == [(("10.0.0.1:1234", 2, 1), timeouts), (("host:99", 4, 3), timeouts), ((), timeouts)]


@pytest.mark.parametrize("args, env, message", [
    (("host:1", 2, None), {}, "process_id"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "'two'"),
    (("host:1", 2, 2), {}, "outside"),
    ((None, None, None), {"SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
])
def test_distributed_errors(calls, args, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_distributed(*args, env=env)
  assert calls == []


# ----------------------------------------------------------------------------------------------- XLA flags


def _run_jitted_op(xla_flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: (x @ x).sum())(jnp.ones((4, 4)))))"
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_overlap_flags_are_accepted_by_xla():
  flags = distributed.overlap_xla_flags(True) + distributed.overlap_xla_flags(False)
  assert not any("xla_gpu_enable_async_collectives" in f for f in flags)
  result = _run_jitted_op(" ".join(flags))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "64.0"
  bogus = _run_jitted_op("--xla_gpu_enable_async_collectives=true")  # removed from XLA: must be fatal
  assert bogus.returncode != 0


def test_apply_xla_flags_appends_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  flags = distributed.overlap_xla_flags(True)
  distributed.apply_xla_flags(flags, env)
  value = distributed.apply_xla_flags(flags, env)
  assert value.split() == ["--xla_force_host_platform_device_count=8", *flags]
