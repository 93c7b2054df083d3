"""Compressed data-parallel gradient means against the exact mean, and HLO collective byte counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from crucible_jax.parallel import compression, mesh as mesh_lib
from crucible_jax.train import losses

SHARDS, PER_SHARD, BLOCK, RANK = 8, 4, 64, 2
TRUE_W = jax.random.normal(jax.random.key(42), (16, 32))


def loss_fn(params, batch, rng):
  """Linear regression towards TRUE_W plus a small conv-shaped weight (a 3-D leaf)."""
  noise = 0.01 * jax.random.normal(rng, batch["y"].shape)
  pred = batch["x"] @ params["w"] + params["b"] + jnp.einsum("bi,ijk->bk", batch["x"][:, :4], params["k"])[:, :1]
  loss = jnp.mean((pred - batch["y"] - noise) ** 2)
  return loss, {"mean_pred": jnp.mean(pred), "examples": jnp.asarray(batch["x"].shape[0])}


def make_batch(step):
  x = jax.random.normal(jax.random.key(step), (SHARDS * PER_SHARD, 16))
  return {"x": x, "y": x @ TRUE_W}


PARAMS = {"w": jnp.zeros((16, 32)), "b": jnp.zeros((32,)), "k": jnp.full((4, 4, 8), 0.1)}
RNG = jax.random.key(7)


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.build_mesh({"data": -1})


@jax.jit
def per_shard(params, batch):
  """((loss, aux), grads) of each data shard (same per-shard rng as inside shard_map), stacked."""
  def one(i, x, y):
    return jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x, "y": y}, jax.random.fold_in(RNG, i))
  shards = jax.tree.map(lambda a: a.reshape(SHARDS, PER_SHARD, *a.shape[1:]), batch)
  return jax.vmap(one)(jnp.arange(SHARDS), shards["x"], shards["y"])


def per_shard_grads(params, batch):
  return per_shard(params, batch)[1]


def exact_mean(params, batch):
  return jax.tree.map(lambda g: g.mean(0), per_shard_grads(params, batch))


@pytest.fixture(scope="module")
def compiled(mesh):
  """One jitted compressed value_and_grad per method, with its initial state."""
  out = {}
  for method in compression.METHODS:  # target_ratio=8: PowerSGD's budget keeps w and k low rank, b goes int8
    fn = compression.make_compressed_value_and_grad(loss_fn, mesh, method, rank=RANK, block=BLOCK, target_ratio=8)
    state = compression.init_compression_state(PARAMS, method, mesh, rank=RANK, block=BLOCK, target_ratio=8)
    out[method] = (jax.jit(fn), state)
  return out


def _max_abs(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_none_and_bf16_match_the_exact_mean(compiled):
  batch = make_batch(0)
  exact = exact_mean(PARAMS, batch)
  (loss, aux), grads, state = compiled["none"][0](PARAMS, batch, {}, RNG)
  assert _max_abs(grads, exact) < 1e-6
  assert state == {}
  (shard_losses, shard_aux), _ = per_shard(PARAMS, batch)
  np.testing.assert_allclose(loss, shard_losses.mean(), rtol=1e-5)
  assert int(aux["examples"]) == SHARDS * PER_SHARD  # integer aux is summed, float aux averaged
  np.testing.assert_allclose(aux["mean_pred"], shard_aux["mean_pred"].mean(), rtol=1e-5)
  _, grads, _ = compiled["bf16"][0](PARAMS, batch, {}, RNG)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact)):
    assert float(jnp.max(jnp.abs(g - e))) <= 1e-2 * float(jnp.max(jnp.abs(e)))
    assert g.dtype == jnp.float32


def test_int8_error_is_within_the_per_block_bound(compiled):
  batch = make_batch(1)
  fn, state = compiled["int8"]
  _, grads, new_state = fn(PARAMS, batch, state, RNG)
  local = jax.vmap(lambda g: ravel_pytree(g)[0])(per_shard_grads(PARAMS, batch))
  padded = state["error"].shape[1]
  local = jnp.pad(local, ((0, 0), (0, padded - local.shape[1]))).reshape(SHARDS, -1, BLOCK)
  exact = local.mean(0)
  first = jnp.abs(local).max(-1).mean(0) / 254  # phase 1: each device's own block scale
  bound = first + (jnp.abs(exact).max(-1) + first) / 254  # phase 2 re-quantises the mean
  flat = ravel_pytree(grads)[0]
  error = jnp.abs(jnp.pad(flat, (0, padded - flat.size)).reshape(-1, BLOCK) - exact)
  assert bool(jnp.all(error <= bound[:, None] * (1 + 1e-4) + 1e-7))
  assert float(error.max()) > 0  # really quantised
  # Residuals hold what quantisation dropped: input minus its int8 round trip, never more than half a step.
  assert 0 < float(jnp.abs(new_state["error"]).max()) <= float(jnp.abs(local).max()) / 254 * (1 + 1e-4)


def test_int8_wire_carries_int8(compiled):
  fn, state = compiled["int8"]
  hlo = fn.lower(PARAMS, make_batch(0), state, RNG).compile().as_text()
  sent = compression.collective_bytes(hlo)
  padded = state["error"].shape[1]
  per_phase = padded * 1 + padded // BLOCK * 4  # int8 values + one float32 scale per block
  assert sent["all-to-all"] == per_phase and sent["all-gather"] == per_phase
  assert sent["all-reduce"] < 64  # only the loss/aux scalars travel uncompressed


def test_error_feedback_tracks_the_true_sum(compiled):
  """Σ compressed = Σ exact − mean residual: the residual stays bounded while the sums grow linearly."""
  for method, final_gap in (("powersgd", 0.3), ("int8", 0.01)):
    fn, state = compiled[method]
    sum_compressed = sum_exact = jax.tree.map(jnp.zeros_like, PARAMS)
    error_norms, relative_gaps = [], []
    for step in range(20):
      batch = make_batch(100 + step)
      _, grads, state = fn(PARAMS, batch, state, RNG)
      sum_compressed = jax.tree.map(jnp.add, sum_compressed, grads)
      sum_exact = jax.tree.map(jnp.add, sum_exact, exact_mean(PARAMS, batch))
      error_norms.append(float(jnp.linalg.norm(state["error"]["w"] if method == "powersgd" else state["error"])))
      gap = jnp.linalg.norm(sum_compressed["w"] - sum_exact["w"]) / jnp.linalg.norm(sum_exact["w"])
      relative_gaps.append(float(gap))
    assert max(error_norms[10:]) < 1.5 * max(error_norms[:10]), (method, error_norms)
    assert relative_gaps[-1] < final_gap and relative_gaps[-1] < 0.5 * relative_gaps[4], (method, relative_gaps)
    if method == "powersgd":
      mean_residual = state["error"]["w"].mean(0)
      np.testing.assert_allclose(sum_compressed["w"], sum_exact["w"] - mean_residual, atol=1e-3)
      # the vector b goes int8 with error feedback: its sum is off by at most the int8 residuals
      gap = jnp.abs(sum_compressed["b"] - sum_exact["b"]).max()
      assert float(gap) <= float(jnp.abs(state["int8"]["error"]).max() + jnp.abs(state["int8"]["chunk_error"]).max())
      assert float(gap) < 1e-2 * float(jnp.abs(sum_exact["b"]).max())


def test_powersgd_state_layout_and_jit_round_trip(mesh, compiled):
  fn, state = compiled["powersgd"]
  assert set(state["error"]) == {"w", "k"} and state["q"]["k"].shape == (8, RANK)
  assert state["int8"]["error"].shape == (SHARDS, SHARDS * BLOCK)  # b's 32 elements, one padded block per device
  assert state["error"]["w"].shape == (SHARDS, 16, 32)
  assert state["error"]["w"].sharding.shard_shape((SHARDS, 16, 32)) == (1, 16, 32)
  _, _, new_state = fn(PARAMS, make_batch(3), state, RNG)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert (old.shape, old.dtype) == (new.shape, new.dtype)
    assert new.sharding.is_equivalent_to(old.sharding, old.ndim)
  _, _, again = fn(PARAMS, make_batch(4), new_state, RNG)
  assert fn._cache_size() == 1  # the returned state is fed back without recompiling
  assert jax.tree.structure(again) == jax.tree.structure(state)


def test_bad_configuration_errors(mesh, compiled):
  with pytest.raises(ValueError, match="'topk'"):
    compression.make_compressed_value_and_grad(loss_fn, mesh, "topk")
  fsdp_mesh = mesh_lib.build_mesh({"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match="int8.*'fsdp': 4"):
    compression.make_compressed_value_and_grad(loss_fn, fsdp_mesh, "int8")
  compression.make_compressed_value_and_grad(loss_fn, fsdp_mesh, "none")  # plain reduction allows any mesh
  wrong_block = compression.init_compression_state(PARAMS, "int8", mesh, block=32)
  with pytest.raises(ValueError, match="comp_state does not fit"):
    compiled["int8"][0](PARAMS, make_batch(0), wrong_block, RNG)


def loss_with_frozen_and_unused(params, batch, rng):
  """`loss_fn` plus a frozen (stop_gradient) scale and a param the loss never reads."""
  loss, aux = loss_fn({k: params[k] for k in ("w", "b", "k")}, batch, rng)
  return loss * jax.lax.stop_gradient(params["frozen"]).mean(), aux


EXTRA = {**PARAMS, "frozen": jnp.ones((64, 64)), "unused": jnp.ones((128, 32))}


def test_trained_leaves_drops_frozen_and_unused_params(mesh):
  trained = compression.trained_leaves(loss_with_frozen_and_unused, EXTRA, make_batch(0), mesh)
  assert trained == {"w": True, "b": True, "k": True, "frozen": False, "unused": False}


@pytest.mark.parametrize("method", ["bf16", "int8"])
def test_only_trained_params_travel(mesh, method):
  """The bucket holds the trained params only: the HLO's collectives are sized by them, frozen grads are zero."""
  trained = compression.trained_leaves(loss_with_frozen_and_unused, EXTRA, make_batch(0), mesh)
  fn = jax.jit(compression.make_compressed_value_and_grad(loss_with_frozen_and_unused, mesh, method,
                                                          trained=trained, block=BLOCK))
  state = compression.init_compression_state(EXTRA, method, mesh, trained=trained, block=BLOCK)
  sent = compression.collective_bytes(fn.lower(EXTRA, make_batch(0), state, RNG).compile().as_text())
  size = sum(x.size for x in jax.tree.leaves(PARAMS))
  if method == "int8":
    padded = -(-size // (BLOCK * SHARDS)) * BLOCK * SHARDS
    assert state["error"].shape == (SHARDS, padded)
    assert sent["all-to-all"] == sent["all-gather"] == padded + padded // BLOCK * 4
  else:  # bfloat16 bits travel as uint16 (XLA:CPU would compile a bfloat16 collective in float32)
    padded = -(-size // SHARDS) * SHARDS
    assert sent["all-to-all"] == sent["all-gather"] == 2 * padded
  _, grads, _ = fn(EXTRA, make_batch(0), state, RNG)
  assert not jnp.any(grads["frozen"]) and not jnp.any(grads["unused"])
  assert jnp.any(grads["w"])


def test_a_loss_over_the_gathered_global_batch_gets_its_exact_gradient(mesh):
  """Contrastive terms all-gather the shards' embeddings (global negatives): all_gather's transpose sums the
  cotangents back to their shards, so the data-parallel mean is the gradient of the global loss."""
  def gathered(params, batch, rng):
    emb = jax.lax.all_gather(batch["x"] @ params["w"], mesh_lib.data_axes(), tiled=True)
    return losses.clip_loss(emb[:, :16], emb[:, 16:], jnp.log(10.0)), {}

  params, batch = {"w": 0.1 * TRUE_W}, make_batch(5)
  fn = jax.jit(compression.make_compressed_value_and_grad(gathered, mesh, "none"))
  (loss, _), grads, _ = fn(params, batch, {}, RNG)
  global_loss = lambda p: losses.clip_loss(*jnp.split(batch["x"] @ p["w"], 2, axis=1), jnp.log(10.0))
  np.testing.assert_allclose(loss, global_loss(params), rtol=1e-5)
  np.testing.assert_allclose(grads["w"], jax.grad(global_loss)(params)["w"], rtol=1e-4, atol=1e-6)


def test_collective_bytes_of_a_psum_over_eight_devices(mesh):
  summed = jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh, in_specs=P("data"), out_specs=P())
  x = jnp.ones((SHARDS * 1024,), jnp.float32)
  assert compression.collective_bytes(jax.jit(summed).lower(x).compile().as_text()) == {"all-reduce": 4096}


def test_collective_bytes_parses_async_and_tuple_results():
  hlo = """
  %all-gather-start = (bf16[8,4]{1,0}, bf16[64,4]{1,0}) all-gather-start(bf16[8,4]{1,0} %p), dimensions={0}
  %all-gather-done = bf16[64,4]{1,0} all-gather-done((bf16[8,4]{1,0}, bf16[64,4]{1,0}) %all-gather-start)
  %all-reduce.7 = (f32[10]{0}, s8[3,5]{1,0}) all-reduce(f32[10]{0} %a, s8[3,5]{1,0} %b), to_apply=%add
  %rs = f32[2,2]{1,0} reduce-scatter(f32[16,2]{1,0} %c), dimensions={0}
  %cp-done = u4[6]{0} collective-permute-done(%cp-start)
  %fusion = f32[10]{0} fusion(f32[10]{0} %all-reduce.7), kind=kLoop
  """
  assert compression.collective_bytes(hlo) == {
      "all-gather": 64 * 4 * 2, "all-reduce": 10 * 4 + 15, "reduce-scatter": 16, "collective-permute": 3}


def test_powersgd_plan_moves_the_narrowest_matrices_to_int8_within_the_byte_budget():
  """Costs per element: bf16 factor 2, int8 1 + 4/256; all low rank costs 24,328, moving narrow +12,288, mid
  +30,208, wide +1,048,576; the budget is 4 × 1,098,240 / target_ratio."""
  leaves = [(name, jax.ShapeDtypeStruct(shape, jnp.float32)) for name, shape in
            (("vec", (512,)), ("narrow", (512, 32)), ("mid", (256, 128)), ("wide", (1024, 1024)))]
  for ratio, low in ((200, {"narrow", "mid", "wide"}), (100, {"mid", "wide"}), (50, {"wide"}), (3, set())):
    plan = compression._powersgd_plan(leaves, rank=4, block=256, target_ratio=ratio)
    assert set(plan) == low, ratio
  assert compression._powersgd_plan(leaves, 4, 256, 50)["wide"] == (1024, 1024)
  thin = [("thin", jax.ShapeDtypeStruct((5, 1000), jnp.float32))]  # rank-4 factors 8,040 B > int8 5,078 B
  assert compression._powersgd_plan(thin, rank=4, block=256, target_ratio=1000) == {}


POLICY_PARAMS = {"wide": jnp.zeros((64, 96)), "narrow": jnp.zeros((40, 32)), "bias": jnp.zeros((96,))}


def policy_loss(params, batch, rng):
  """A wide matrix (low rank suits it), a 32-wide one and a vector (int8 for both)."""
  x = batch["x"]
  pred = x @ params["wide"] + params["bias"] + jnp.tile(x[:, :40] @ params["narrow"], (1, 3))
  return jnp.mean((pred - jnp.tanh(x @ jnp.ones((64, 96)))) ** 2), {}


def test_powersgd_sends_low_rank_bfloat16_factors_and_int8_for_the_rest(mesh):
  """Per-tensor policy in the compiled HLO: P and Q of the wide matrix as bfloat16 bits, the narrow matrix (moved
  to int8 within the default budget) and the vector in one int8 bucket with float32 block scales; no float32
  gradient all-reduce, and the bytes are within 1/TARGET_RATIO of a float32 all-reduce."""
  fn = jax.jit(compression.make_compressed_value_and_grad(policy_loss, mesh, "powersgd", block=BLOCK))
  state = compression.init_compression_state(POLICY_PARAMS, "powersgd", mesh, block=BLOCK)
  assert set(state["q"]) == set(state["error"]) == {"wide"} and state["q"]["wide"].shape == (96, 4)
  int8_padded = -(-(40 * 32 + 96) // (BLOCK * SHARDS)) * BLOCK * SHARDS
  assert state["int8"]["error"].shape == (SHARDS, int8_padded)
  batch = {"x": jax.random.normal(jax.random.key(3), (SHARDS * PER_SHARD, 64))}
  sent = compression.collective_bytes(fn.lower(POLICY_PARAMS, batch, state, RNG).compile().as_text())
  factors = 2 * (64 * 4 + 96 * 4)  # uint16 bits of P (64x4) and Q (96x4), each through all-to-all and all-gather
  int8 = int8_padded + int8_padded // BLOCK * 4
  assert sent["all-to-all"] == sent["all-gather"] == factors + int8
  assert sent["all-reduce"] < 64  # only the loss scalar
  f32_allreduce = 2 * 4 * sum(x.size for x in jax.tree.leaves(POLICY_PARAMS))  # result bytes of both ring phases
  assert sent["all-to-all"] + sent["all-gather"] <= f32_allreduce / compression.TARGET_RATIO
  _, grads, new_state = fn(POLICY_PARAMS, batch, state, RNG)
  assert all(bool(jnp.any(g)) for g in jax.tree.leaves(grads))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
