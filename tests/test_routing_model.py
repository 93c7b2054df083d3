"""The modality router inside CrucibleModel: static capacities, gradients, skipped == absent, budget 1.0 == dense."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crucible_jax.bench.common import compiled_flops
from crucible_jax.config import ConfigError, load_experiment, validate
from crucible_jax.models import build_model, default_model_config, example_batch
from crucible_jax.models.router import routing_spec
from crucible_jax.train import objectives, stages
from crucible_jax.train.setup import Experiment

B = 8
HEADS = ("embed", "vqa", "fused")
EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def _config(budget: dict | None, groups: int = 1):
  """An image+text model small enough to compile in seconds; `budget=None` = routing off."""
  cfg = default_model_config()
  cfg.modalities = ("image", "text")
  for family in ("image", "text"):
    cfg[family].update(width=16, depth=1, heads=2, mlp=32)
  cfg.joint_dim = 16
  if budget is not None:
    cfg.routing.enabled = True
    cfg.routing.budget.update(budget)
    cfg.routing.groups = groups
  return cfg


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  batch = {k: np.asarray(v) for k, v in example_batch(_config(None), B).items()}
  batch["image"] = rng.random(batch["image"].shape, np.float32)
  batch["text"] = rng.integers(1, 259, batch["text"].shape).astype(np.int32)
  batch["question"] = rng.integers(1, 259, batch["question"].shape).astype(np.int32)
  return batch


def _apply(model, train: bool):
  return jax.jit(lambda v, b, r: model.apply(v, b, train=train, heads=HEADS, rngs={"routing": r}))


def _compiled(model, variables, train: bool = False):
  """The model's apply compiled once for B-sized batches (reused by every test that needs it)."""
  return _apply(model, train).lower(variables, _batch(0), jax.random.key(0)).compile()


@pytest.fixture(scope="module")
def models():
  """Dense, half-budget (2 groups) and full-budget models sharing one set of params (the routed superset)."""
  dense = build_model(_config(None))
  half = build_model(_config({"image": 0.5, "text": 0.75}, groups=2))
  full = build_model(_config({"image": 1.0, "text": 1.0}))
  init_batch = example_batch(_config(None), B)
  variables = jax.jit(lambda r: half.init({"params": r, "routing": r}, init_batch, heads=HEADS))(jax.random.key(0))
  return dense, half, full, variables


@pytest.fixture(scope="module")
def dense_eval(models):
  return _compiled(models[0], models[3])


@pytest.fixture(scope="module")
def half_eval(models):
  return _compiled(models[1], models[3])


def test_capacity_respected_with_static_shapes_in_the_full_model(models, dense_eval, half_eval):
  dense, half, _, variables = models
  batch, other = _batch(0), _batch(1)
  reference = dense_eval(variables, batch, jax.random.key(0))
  for b in (batch, other):  # new content, same executable: shapes never depend on the routing decision
    out = half_eval(variables, b, jax.random.key(0))
    selected = {m: np.asarray(out["present"][m]) for m in ("image", "text")}
    per_group = {m: s.reshape(2, -1).sum(1) for m, s in selected.items()}
    np.testing.assert_array_equal(per_group["image"], [2, 2])  # 0.5 of 4 rows per group
    np.testing.assert_array_equal(per_group["text"], [3, 3])  # ceil(0.75 * 4) per group
    assert np.all(selected["image"] | selected["text"])  # min_modalities=1: nobody is dropped entirely
    assert float(out["routing_aux"]["usage"]["image"]) == 0.5
    for key in ("fused_logits", "vqa_logits"):
      assert out[key].shape == reference[key].shape and np.all(np.isfinite(out[key]))
  assert compiled_flops(half_eval) < 0.85 * compiled_flops(dense_eval)  # the encoders really run on fewer rows


def test_gradients_reach_the_estimator_through_the_task_losses(models):
  _, half, _, variables = models
  batch = _batch(0)

  def task_loss(params):
    out = half.apply({"params": params}, batch, train=True, heads=HEADS, rngs={"routing": jax.random.key(3)})
    return jnp.mean(jnp.square(out["fused_logits"])) + jnp.mean(jnp.square(out["vqa_logits"]))

  grads = jax.jit(jax.grad(task_loss))(variables["params"])
  estimator = jax.tree.leaves(grads["router"]["estimator"])
  norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in estimator)))
  assert np.isfinite(norm) and norm > 0.0, norm  # the task losses alone reach the estimator


def test_skipped_modality_equals_the_modality_absent(models, dense_eval, half_eval):
  _, _, _, variables = models
  batch = _batch(0)
  routed = half_eval(variables, batch, jax.random.key(0))
  skipped = ~np.asarray(routed["present"]["image"])
  assert skipped.any() and np.all(np.asarray(routed["present"]["text"])[skipped])
  absent = dict(batch, image_present=batch["image_present"] & ~skipped)
  masked = dense_eval(variables, absent, jax.random.key(0))
  for key in ("fused_logits", "vqa_logits"):  # VQA reads no image in either case: only the question's prior
    np.testing.assert_allclose(np.asarray(routed[key])[skipped], np.asarray(masked[key])[skipped],
                               rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_array_equal(np.asarray(routed["fusion_weights"])[skipped, 0], 0.0)


@pytest.mark.parametrize("train", [False, True])
def test_budget_one_reproduces_the_dense_model_bitwise(models, dense_eval, train):
  dense, _, full, variables = models
  batch = _batch(2)
  want = (_compiled(dense, variables, train) if train else dense_eval)(variables, batch, jax.random.key(5))
  got = _compiled(full, variables, train)(variables, batch, jax.random.key(5))
  assert set(got) == set(want) | {"routing_aux"}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(
      {k: got[k] for k in want})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_route_false_bypasses_the_plan_and_equals_the_dense_model(models, dense_eval):
  dense, half, _, variables = models
  batch = _batch(3)
  want = dense_eval(variables, batch, jax.random.key(6))
  got = jax.jit(lambda v, b, r: half.apply(v, b, heads=HEADS, route=False, rngs={"routing": r}))(
      variables, batch, jax.random.key(6))
  assert set(got) == set(want) | {"routing_aux"}  # the estimator still scores; its plan is not applied
  assert all(np.asarray(p).all() for p in got["present"].values())
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves({k: got[k] for k in want})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_a_dense_stage_teaches_the_estimator_every_sample(models):
  half = models[1]
  init_batch = _batch(0)
  variables = jax.jit(lambda r: half.init({"params": r, "routing": r}, init_batch, heads=("pretrain",)))(
      jax.random.key(0))
  _, objective = objectives.build_objective({"routing/utility": 1.0})
  batch = {**_batch(4), "digits": np.tile(np.array([[3, 1, -1, -1]], np.int32), (B, 1)),
           "num_digits": np.full((B,), 2, np.int32)}

  def utility_loss(params, route):
    out = half.apply({"params": params}, batch, train=True, heads=("pretrain",), route=route,
                     rngs={"routing": jax.random.key(7)})
    return objective(out, batch)[0], out["present"]

  for route in (False, True):
    grads, present = jax.jit(jax.grad(lambda p: utility_loss(p, route), has_aux=True))(variables["params"])
    estimator = jax.tree.leaves(grads["router"]["estimator"])
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in estimator)
    # route=False: every image is encoded and so has a target; routed at 0.5: half of them
    assert int(np.asarray(present["image"]).sum()) == (B if not route else B // 2)


def test_routing_objective_terms_read_the_router_aux():
  aux = {"budget_loss": jnp.float32(0.25), "balance_loss": jnp.float32(0.5),
         "usage": {"image": jnp.float32(0.5), "text": jnp.float32(1.0)}}
  heads, objective = objectives.build_objective({"routing/budget": 2.0, "routing/balance": 0.1})
  assert heads == ()
  loss, metrics = objective({"routing_aux": aux}, {})
  assert float(loss) == pytest.approx(2.0 * 0.25 + 0.1 * 0.5)
  assert float(metrics["routing/usage_image"]) == 0.5
  with pytest.raises(ValueError, match="routing.enabled"):
    objective({}, {})


def test_routing_utility_teaches_the_estimator_which_modality_reads_the_digits():
  digits = np.array([[3, 1], [4, -1]], np.int32)
  num_digits = np.array([2, 1], np.int32)
  right = 8.0 * np.eye(11, dtype=np.float32)[[[3, 1], [4, 10]]]  # reads both samples' digits (10 = no digit)
  logits = {"image": right, "text": -right}  # text reads every position wrong
  scores = {"image": jnp.zeros(2), "text": jnp.zeros(2)}
  outputs = {"pretrain_logits": logits, "present": {"image": np.array([True, True]), "text": np.array([True, False])},
             "routing_aux": {"scores": scores}}
  batch = {"digits": digits, "num_digits": num_digits}
  heads, objective = objectives.build_objective({"routing/utility": 1.0})
  assert heads == ("pretrain",)
  loss, metrics = objective(outputs, batch)
  assert float(metrics["routing/utility_image"]) > 0.99 and float(metrics["routing/utility_text"]) < 0.01
  assert float(loss) == pytest.approx(np.log(2.0), rel=1e-3)  # sigmoid(0) = 0.5 against targets ~1 and ~0

  def loss_of(s):
    return objective({**outputs, "routing_aux": {"scores": s}}, batch)[0]

  grads = jax.grad(loss_of)(scores)
  assert np.all(np.asarray(grads["image"]) < 0)  # descent raises the score of the modality that reads
  assert float(grads["text"][0]) > 0 and float(grads["text"][1]) == 0.0  # lowers text's; skipped sample 1: no target
  with pytest.raises(ValueError, match="routing.enabled"):
    objective({"pretrain_logits": logits}, batch)


def test_routing_config_is_validated_and_the_routed_experiment_builds():
  cfg = _config({"image": 0.5, "text": 1.0})
  assert routing_spec(cfg.routing, ("image", "text")).budget == (("image", 0.5), ("text", 1.0))
  cfg.routing.budget.image = 0.0
  with pytest.raises(ValueError, match="routing.budget.image"):
    build_model(cfg)
  assert build_model(_config(None)).config.routing is None
  routed = load_experiment(f"{EXPERIMENTS / 'digit_world.py'}:tiny,routed", [])
  model = build_model(routed.model)
  assert model.config.routing is not None and "routing/budget" in routed.stages.joint.objective
  assert routed.stages.unimodal.route is False and "routing/budget" not in routed.stages.unimodal.objective
  with routed.unlocked():
    routed.stages.unimodal.objective["routing/utility"] = 1.0  # trains the estimator: fine without a plan
  validate(routed)
  with routed.unlocked():
    routed.stages.unimodal.objective["routing/budget"] = 1.0
  with pytest.raises(ConfigError, match=r"stages.unimodal.route=False .*\['routing/budget'\]"):
    validate(routed)


def test_routed_stages_carry_the_estimator_and_the_unrouted_ablation_still_builds():
  ablations = EXPERIMENTS / "digit_world_ablations.py"
  for variant in ("full", "no_routing"):
    Experiment(load_experiment(f"{ablations}:{variant}", []))  # every carry pattern must match one of its params
  carry = load_experiment(f"{ablations}:full", []).stages.align.carry
  previous = {"router": {"estimator": {"w": 1}}, "encoders_image": {"w": 1}, "fused_head": {"w": 1}}
  fresh = jax.tree.map(lambda _: 0, previous)
  assert stages.handoff(previous, fresh, carry) == {
      "router": {"estimator": {"w": 1}}, "encoders_image": {"w": 1}, "fused_head": {"w": 0}}
