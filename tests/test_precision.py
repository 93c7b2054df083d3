"""Mixed-precision policy and dynamic loss scaling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from crucible_jax.parallel import precision


def test_policy_from_config_and_defaults():
  policy = precision.Policy.from_config(dict(compute="bfloat16", params="float32", families=dict(audio="float32")))
  assert policy.compute_dtype == jnp.bfloat16 and policy.param_dtype == jnp.float32
  assert policy.output_dtype == jnp.float32
  assert policy.family_dtype("audio") == jnp.float32 and policy.family_dtype("image") == jnp.bfloat16
  assert not policy.needs_loss_scaling
  assert precision.Policy.from_config(None) == precision.Policy()
  assert precision.Policy.from_config(dict(compute="float16")).needs_loss_scaling
  assert precision.Policy.from_config(dict(families=dict(text="float16"))).needs_loss_scaling


@pytest.mark.parametrize("cfg, message", [
    (dict(compute="fp16"), "precision.compute='fp16'"),
    (dict(params="float16"), "precision.params"),
    (dict(families=dict(smell="float32")), "smell"),
    (dict(compute="float32", master="float32"), "master"),
])
def test_policy_rejects_bad_config(cfg, message):
  with pytest.raises(ValueError, match=message):
    precision.Policy.from_config(cfg)


def test_apply_to_model_config_writes_dtype_fields():
  model = ml_collections.ConfigDict(dict(width=32, image=dict(patch=4), text=dict(vocab=100), audio=dict(),
                                         fusion=dict(heads=2)))
  model.lock()
  policy = precision.Policy.from_config(dict(compute="bfloat16", families=dict(audio="float32")))
  policy.apply_to_model_config(model)
  assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
  assert (model.image.dtype, model.text.dtype, model.fusion.dtype) == ("bfloat16",) * 3
  assert model.audio.dtype == "float32" and "video" not in model
  with pytest.raises(ValueError, match="video"):
    precision.Policy.from_config(dict(families=dict(video="float32"))).apply_to_model_config(model)


def test_all_finite_and_select_tree():
  assert bool(precision.all_finite({"a": jnp.ones(3), "b": [jnp.zeros((2, 2))]}))
  assert not bool(precision.all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.nan])}))
  assert not bool(precision.all_finite({"a": jnp.array([jnp.inf], jnp.float16)}))
  picked = precision.select_tree(jnp.array(False), {"x": jnp.ones(2)}, {"x": jnp.zeros(2)})
  np.testing.assert_array_equal(picked["x"], [0.0, 0.0])


def loss_fn(params, x):
  """A float16 forward pass, the situation loss scaling exists for."""
  return jnp.sum((x.astype(jnp.float16) * params["w"].astype(jnp.float16)) ** 2).astype(jnp.float32)


@jax.jit
def train_step(params, loss_scale, x):
  grads = jax.grad(lambda p: loss_scale.scale_loss(loss_fn(p, x)))(params)
  grads = loss_scale.unscale(grads)
  finite = precision.all_finite(grads)
  updated = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
  return precision.select_tree(finite, updated, params), loss_scale.update(finite), grads


def test_loss_scale_skips_overflow_and_grows_after_period():
  params = {"w": jnp.full((4,), 0.5, jnp.float32)}
  scale = precision.DynamicLossScale.create(initial_scale=2.0**10, period=3)
  x = jnp.full((4,), 0.1)
  new_params, scale, grads = train_step(params, scale, x)
  np.testing.assert_allclose(grads["w"], 2 * 0.01 * 0.5, rtol=1e-2)  # unscaled back to the true gradient
  assert float(scale.scale) == 2.0**10 and int(scale.good_steps) == 1
  stuck, scale, _ = train_step(new_params, scale, x.at[0].set(jnp.inf))
  np.testing.assert_array_equal(stuck["w"], new_params["w"])  # update skipped
  assert float(scale.scale) == 2.0**9 and int(scale.good_steps) == 0  # scale halved
  for _ in range(3):
    stuck, scale, _ = train_step(stuck, scale, x)
  assert float(scale.scale) == 2.0**10 and int(scale.good_steps) == 0  # grew after `period` good steps
  assert not np.array_equal(stuck["w"], new_params["w"])


def test_loss_scale_floor_and_validation():
  scale = precision.DynamicLossScale.create(initial_scale=2.0)
  for _ in range(3):
    scale = scale.update(jnp.array(False))
  assert float(scale.scale) == 1.0
  assert jax.tree.leaves(scale)[0] is scale.scale  # period/factor are static, only arrays are leaves
  with pytest.raises(ValueError, match="factor > 1"):
    precision.DynamicLossScale.create(factor=1.0)
