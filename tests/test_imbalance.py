"""Modality-imbalance remedies: adaptive normalisation, per-group LRs and schedules, OGM-GE, selective updates."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from crucible_jax.config import load_experiment_module
from crucible_jax.models import balance, build_model, default_model_config, example_batch
from crucible_jax.models.fusion import AdaptiveFusion, ModalityNorm
from crucible_jax.train import losses, optim
from crucible_jax.train import step as step_lib
from crucible_jax.train.state import TrainState

KEY = jax.random.key(0, impl="rbg")
B = 8


# --- adaptive feature normalisation ----------------------------------------------------------------------------

def test_modality_norm_removes_scale_per_modality_and_fusion_uses_it():
  x = jax.random.normal(jax.random.key(1), (4, 16))
  features = {"image": 1000.0 * x + 5.0, "audio": 0.05 * x}
  norm = ModalityNorm(("image", "audio"))
  variables = jax.jit(norm.init)(KEY, features)
  assert set(variables["params"]) == {"norm_image", "norm_audio"}  # nothing shared across modalities
  apply = jax.jit(norm.apply)
  out = apply(variables, features)
  for m in ("image", "audio"):  # a 2x10^4 gap in magnitude is gone at init: each sample has mean 0, unit variance
    np.testing.assert_allclose(np.mean(out[m], axis=-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.std(out[m], axis=-1), 1.0, rtol=1e-2)
  # The learned scale is per modality: scaling audio's parameter changes audio's output only.
  params = jax.tree.map(lambda p: p, nn.meta.unbox(variables["params"]))
  params["norm_audio"]["scale"] = params["norm_audio"]["scale"] * 3.0
  scaled = apply({"params": params}, features)
  np.testing.assert_allclose(scaled["audio"], 3.0 * out["audio"], rtol=1e-5)
  np.testing.assert_array_equal(scaled["image"], out["image"])
  fusion = AdaptiveFusion(("image", "audio"))
  present = {"image": jnp.ones((4,), bool), "audio": jnp.ones((4,), bool)}
  assert "modality_norm" in jax.eval_shape(fusion.init, KEY, features, present)["params"]


# --- OGM-GE: coefficients and the gradient op -----------------------------------------------------------------

def test_ogm_coefficients_scale_only_the_dominant_modality():
  coeffs = balance.ogm_coefficients({"image": jnp.float32(0.8), "audio": jnp.float32(0.2)}, alpha=0.1)
  np.testing.assert_allclose(coeffs["image"], 1.0 - np.tanh(0.1 * (0.8 / 0.2 - 1.0)), rtol=1e-6)
  assert float(coeffs["audio"]) == 1.0
  equal = balance.ogm_coefficients({"image": jnp.float32(0.5), "audio": jnp.float32(0.5)}, alpha=0.1)
  assert float(equal["image"]) == float(equal["audio"]) == 1.0


def test_modulate_gradient_is_identity_forward_and_scales_plus_noise_backward():
  x = jax.random.normal(jax.random.key(2), (64, 128))
  upstream = jax.random.normal(jax.random.key(3), x.shape)
  grad = jax.jit(lambda c, n, k: jax.grad(lambda v: jnp.sum(balance.modulate_gradient(v, c, n, k) * upstream))(x))
  np.testing.assert_array_equal(balance.modulate_gradient(x, 0.3, 1.0, jax.random.key(0)), x)
  np.testing.assert_allclose(grad(jnp.float32(0.3), jnp.float32(0.0), jax.random.key(0)), 0.3 * upstream, rtol=1e-6)
  noisy = grad(jnp.float32(0.3), jnp.float32(0.5), jax.random.key(4))
  np.testing.assert_array_equal(noisy, grad(jnp.float32(0.3), jnp.float32(0.5), jax.random.key(4)))  # reproducible
  assert not np.array_equal(noisy, grad(jnp.float32(0.3), jnp.float32(0.5), jax.random.key(5)))
  noise = noisy - 0.3 * upstream  # Gaussian enhancement: std = ge_scale * std(g)
  np.testing.assert_allclose(np.std(noise), 0.5 * np.std(upstream), rtol=0.05)
  assert abs(float(np.mean(noise))) < 0.02


def test_balance_config_is_validated():
  with pytest.raises(ValueError, match="model.balance.method"):
    balance.balance_spec({"method": "gradnorm"})
  with pytest.raises(ValueError, match="unknown fields"):
    balance.balance_spec({"method": "ogm_ge", "beta": 1.0})


# --- OGM-GE in the model, and frozen modules under a real train step -----------------------------------------

def _model_cfg(method: str) -> ml_collections.ConfigDict:
  cfg = default_model_config()
  cfg.modalities = ("image", "text")
  for m in ("image", "text"):
    cfg[m].update(width=8, heads=1, mlp=16)
  cfg.joint_dim = 8
  cfg.balance.update(method=method, alpha=0.05, ge_scale=0.0)
  return cfg


@pytest.fixture(scope="module")
def dominant_image():
  """Params and a batch where the fused head, given the image alone, is far more confident than given the text."""
  rng = np.random.default_rng(0)
  base = example_batch(_model_cfg("none"), B)
  batch = dict(base, image=jnp.asarray(rng.random(base["image"].shape), jnp.float32),
               text=jnp.asarray(rng.integers(1, 200, base["text"].shape), jnp.int32))
  model = build_model(_model_cfg("none"))

  def make(rng):  # one compile: init, sharpen the fused head, read the image-alone predictions
    params = nn.meta.unbox(model.init(rng, batch)["params"])
    head = params["fused_head"]["logits"]
    head["kernel"] = head["kernel"] * 2.0  # sharper, not saturated: the text-alone confidence must stay > 0
    head["bias"] = head["bias"].reshape(4, 11).at[:, 10].set(-1e3).reshape(-1)  # never "no digit"
    alone = dict(batch, text_present=jnp.zeros((B,), bool))
    logits = model.apply({"params": params}, alone, heads=("fused",))["fused_logits"]
    return params, jnp.argmax(logits[..., :10], axis=-1).astype(jnp.int32)  # the image alone is right

  params, labels = jax.jit(make)(KEY)
  batch = dict(batch, digits=labels, num_digits=jnp.full((B,), 4, jnp.int32), weight=jnp.ones((B,), jnp.float32))
  return params, batch


def _train(method: str, params, batch, steps: int):
  """`steps` real train steps (step.py: stop_frozen, skip-if-not-finite) with `fusion` frozen.

  The optimizer is SGD behind `optax.trace(decay=0)`, whose state holds the last gradient exactly.
  """
  model = build_model(_model_cfg(method))
  frozen = jax.tree.map(lambda label: label == optim.FROZEN, optim.param_labels(params, ("^fusion/",), {}))

  def objective(outputs, b):
    coeffs = {f"coeff/{m}": k for m, k in outputs.get("balance_coeffs", {}).items()}
    return losses.position_loss(outputs["fused_logits"], b["digits"], b["num_digits"]), coeffs

  tx = optax.chain(optax.trace(decay=0.0), optax.scale(-1e-2))
  train_step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, objective, ("fused",), frozen)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), comp_state={},
                     skipped=jnp.zeros((), jnp.int32), tx=tx)
  first = None
  for i in range(steps):
    state, metrics = train_step(state, batch, jax.random.key(i))
    assert bool(metrics["finite"])
    first = (state.opt_state[0].trace, metrics) if first is None else first
  return state.params, *first


@pytest.fixture(scope="module")
def trained(dominant_image):
  params, batch = dominant_image
  return {method: _train(method, params, batch, steps=3) for method in ("none", "ogm_ge")}


def test_ogm_ge_scales_down_the_dominant_encoders_gradient(trained):
  norms = {method: {m: float(optax.tree.norm(grads[f"encoders_{m}"])) for m in ("image", "text")}
           for method, (_, grads, _) in trained.items()}
  metrics = trained["ogm_ge"][2]
  assert "coeff/image" not in trained["none"][2] and float(metrics["coeff/text"]) == 1.0
  k_image = float(metrics["coeff/image"])
  assert 0.0 < k_image < 0.9, k_image  # image is dominant, so its gradient is scaled down
  np.testing.assert_allclose(norms["ogm_ge"]["text"], norms["none"]["text"], rtol=1e-5)  # weak one untouched
  ratio = (norms["ogm_ge"]["image"] / norms["ogm_ge"]["text"]) / (norms["none"]["image"] / norms["none"]["text"])
  np.testing.assert_allclose(ratio, k_image, rtol=1e-4)


def test_frozen_module_stays_bitwise_unchanged_over_train_steps(dominant_image, trained):
  params, _ = dominant_image
  for method, (final, grads, _) in trained.items():
    for a, b in zip(jax.tree.leaves(params["fusion"]), jax.tree.leaves(final["fusion"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["fusion"]))  # stop_gradient
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["encoders_image"]),
                                                      jax.tree.leaves(final["encoders_image"]))]
    assert all(moved), method


# --- modality-specific learning rates, schedules and gradient-norm skipping ------------------------------------

def _optim_run(optim_extra: dict, grads_scale: dict | None = None, steps: int = 3, frozen=()):
  """Params of three groups after `steps` AdamW updates with constant gradients (no weight decay)."""
  params = {"image_encoder": {"w": jnp.ones((4, 4))}, "audio_encoder": {"w": jnp.ones((4, 4))},
            "head": {"w": jnp.ones((4, 4))}}
  optim_cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1e9,
                                             groups={"image": "image_encoder", "audio": "audio_encoder"},
                                             **optim_extra))
  stage = ml_collections.ConfigDict(dict(lr=0.1, warmup=0, steps=100, frozen=tuple(frozen)))
  tx = optim.build_optimizer(stage, optim_cfg, params)
  scale = grads_scale or {}
  grads = {k: {"w": jnp.full((4, 4), scale.get(k, 1.0))} for k in params}
  state, history, update = tx.init(params), [], jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _moved(history, group, step=-1):
  return float(jnp.max(jnp.abs(history[step][group]["w"] - 1.0)))


def test_group_lr_scale_zero_and_frozen_do_not_move_and_multiplier_applies():
  history, _ = _optim_run(dict(lr_scale={"image": 0.0, "audio": 2.0}))
  np.testing.assert_array_equal(history[-1]["image_encoder"]["w"], 1.0)  # LR 0: bitwise unchanged
  assert _moved(history, "head") > 0
  np.testing.assert_allclose(_moved(history, "audio_encoder"), 2.0 * _moved(history, "head"), rtol=1e-5)
  frozen_history, _ = _optim_run({}, frozen=("audio_encoder",))
  np.testing.assert_array_equal(frozen_history[-1]["audio_encoder"]["w"], 1.0)


def test_group_schedule_delay_and_decay():
  history, _ = _optim_run(dict(schedules={"audio": dict(delay=2, warmup=0, decay="constant")}), steps=4)
  assert _moved(history, "audio_encoder", 1) == 0.0 and _moved(history, "audio_encoder", 2) > 0
  assert _moved(history, "head", 1) > 0
  schedule = optim.group_schedule(1.0, 0, 10, dict(decay="linear", end_fraction=0.0))
  assert float(schedule(10)) == pytest.approx(0.0, abs=1e-6) and float(schedule(5)) < 1.0
  with pytest.raises(ValueError, match="optim.schedules.audio.decay"):
    _optim_run(dict(schedules={"audio": dict(decay="step")}))
  with pytest.raises(ValueError, match="optim.lr_scale names groups"):
    _optim_run(dict(lr_scale={"videos": 2.0}))
  with pytest.raises(ValueError, match=r"lr=0.1 x optim.lr_scale.audio=1e\+40 overflows float32"):
    _optim_run(dict(lr_scale={"audio": 1e40}))  # an inf LR would turn zero-gradient params into NaN


def test_small_gradient_groups_are_skipped():
  history, state = _optim_run(dict(skip_below={"audio": 1e-3, "image": 1e-3}),
                              grads_scale={"audio_encoder": 1e-6, "image_encoder": 1.0})
  np.testing.assert_array_equal(history[-1]["audio_encoder"]["w"], 1.0)
  assert _moved(history, "image_encoder") > 0
  assert optim.skipped_updates(state) == 3  # the audio group, every step


# --- the imbalance experiment's runner -------------------------------------------------------------------------

def test_imbalance_runner_trains_and_probes_every_arm(tmp_path):
  """The seconds-long run of `experiments/digit_world_imbalance.py`: three arms, each probed, the weak one alone."""
  runner = load_experiment_module(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world_imbalance.py")
  assert runner.get_config("audio_alone").model.modalities == ("audio",)
  assert runner.get_config().data.speech_snr_db == (0.0, 10.0)
  summary = runner.main(["--workdir", str(tmp_path), "--tiny", "--probe-batches", "1",
                         "--config.model.balance.alpha=0.3"])
  assert set(summary) == {"init", *runner.ARMS}
  for arm in runner.ARMS:
    assert summary[arm]["steps"] == 4 and 0.0 <= summary[arm]["test/fused/accuracy"] <= 1.0
    assert 0.0 <= summary[arm]["probe/audio/first_digit"] <= 1.0
    saved = json.loads((tmp_path / arm / "config.json").read_text())
    assert saved["model"]["balance"]["alpha"] == 0.3  # the runner's --config overrides reach every arm
  assert json.loads((tmp_path / "probe.json").read_text()) == json.loads(json.dumps(summary))
