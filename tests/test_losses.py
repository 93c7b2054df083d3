"""Losses against hand computations; ring-chunked contrastive losses against the dense ones; objectives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crucible_jax.data.digit_world.tasks  # noqa: F401  (registers DigitWorld's pretrain and fused tasks)
from crucible_jax.train import losses, objectives

GLOBAL_B, DIM = 32, 8
# Jitted once per signature: op-by-op eager dispatch is slower than one compile.
clip_loss, siglip_loss = jax.jit(losses.clip_loss), jax.jit(losses.siglip_loss)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_clip_loss_matches_hand_computation_on_2x2():
  a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  b = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  # temperature 2: logits [[2, 1.2], [0, 1.6]]
  lse = lambda x, y: math.log(math.exp(x) + math.exp(y))
  a_to_b = (lse(2, 1.2) - 2) + (lse(0, 1.6) - 1.6)
  b_to_a = (lse(2, 0) - 2) + (lse(1.2, 1.6) - 1.6)
  expected = 0.5 * (a_to_b / 2 + b_to_a / 2)
  np.testing.assert_allclose(clip_loss(a, b, jnp.log(2.0)), expected, rtol=1e-6)


def test_siglip_loss_matches_hand_computation_on_2x2():
  a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  b = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  logits = np.array([[2, 1.2], [0, 1.6]]) - 1.0  # temperature 2, bias -1
  labels = np.array([[1, -1], [-1, 1]])
  expected = -_log_sigmoid(labels * logits).sum() / 2
  np.testing.assert_allclose(siglip_loss(a, b, jnp.log(2.0), -1.0), expected, rtol=1e-6)


def _unit_rows(key, n=6, d=4):
  x = jax.random.normal(key, (n, d))
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def test_clip_multi_positive_ids_use_soft_targets():
  a, b = _unit_rows(jax.random.key(1)), _unit_rows(jax.random.key(2))
  ids = np.array([0, 0, 1, 2, 2, 2])
  logits = np.exp(0.5) * np.asarray(a) @ np.asarray(b).T
  targets = (ids[:, None] == ids[None, :]).astype(np.float64)
  targets /= targets.sum(axis=1, keepdims=True)
  expected = 0.5 * (-(targets * _log_softmax(logits)).sum(1).mean() - (targets * _log_softmax(logits.T)).sum(1).mean())
  np.testing.assert_allclose(clip_loss(a, b, jnp.float32(0.5), ids=jnp.array(ids)), expected, rtol=1e-5)
  assert not np.isclose(clip_loss(a, b, jnp.float32(0.5)), expected)  # ids change the answer


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_invalid_and_zero_weight_rows_are_ignored(loss_name):
  a, b = _unit_rows(jax.random.key(3)), _unit_rows(jax.random.key(4))
  keep = np.array([True, False, True, True, False, True])
  ids = jnp.array([0, 1, 0, 2, 2, 3])
  loss = (lambda *x, **k: clip_loss(*x, 0.3, **k)) if loss_name == "clip" else (
      lambda *x, **k: siglip_loss(*x, 0.3, -2.0, **k))
  subset = loss(a[keep], b[keep], ids=ids[keep])
  np.testing.assert_allclose(loss(a, b, ids=ids, valid=jnp.array(keep)), subset, rtol=1e-6)
  np.testing.assert_allclose(loss(a, b, ids=ids, weight=jnp.array(keep, jnp.float32)), subset, rtol=1e-6)
  assert np.isfinite(loss(a, b, valid=jnp.zeros(6, bool)))


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def contrastive_case():
  rng = np.random.RandomState(0)
  a = rng.normal(size=(GLOBAL_B, DIM)).astype(np.float32)
  b = (a + rng.normal(size=a.shape)).astype(np.float32)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  with_duplicates = dict(ids=rng.randint(0, 12, GLOBAL_B).astype(np.int32), valid=rng.rand(GLOBAL_B) > 0.25,
                         weight=rng.uniform(0.5, 2.0, GLOBAL_B).astype(np.float32))
  plain = dict(ids=np.arange(GLOBAL_B, dtype=np.int32), valid=np.ones(GLOBAL_B, bool),
               weight=np.ones(GLOBAL_B, np.float32))
  return a, b, (with_duplicates, plain)


def _grad_fns(mesh, kind):
  argnums = (0, 1, 2, 3)
  if kind == "clip":
    dense = lambda a, b, s, t, ids, valid, w: clip_loss(a, b, s, ids=ids, valid=valid, weight=w) + 0 * t
    ring = lambda a, b, s, t, ids, valid, w: losses.clip_loss_sharded(
        a, b, s, mesh, ids=ids, valid=valid, weight=w) + 0 * t
  else:
    dense = lambda a, b, s, t, ids, valid, w: siglip_loss(a, b, s, t, ids=ids, valid=valid, weight=w)
    ring = lambda a, b, s, t, ids, valid, w: losses.siglip_loss_sharded(
        a, b, s, t, mesh, ids=ids, valid=valid, weight=w)
  return jax.jit(jax.value_and_grad(dense, argnums)), jax.jit(jax.value_and_grad(ring, argnums))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_sharded_loss_and_grads_equal_dense_without_global_matrix(mesh, contrastive_case, kind):
  a, b, cases = contrastive_case
  dense, ring = _grad_fns(mesh, kind)
  args = (a, b, np.float32(2.3), np.float32(-3.0))
  for case in cases:
    extra = (case["ids"], case["valid"], case["weight"])
    (dense_loss, dense_grads), (ring_loss, ring_grads) = dense(*args, *extra), ring(*args, *extra)
    np.testing.assert_allclose(ring_loss, dense_loss, rtol=1e-5, atol=1e-5)
    for dense_grad, ring_grad in zip(dense_grads, ring_grads):
      np.testing.assert_allclose(ring_grad, dense_grad, rtol=1e-5, atol=1e-5)
  global_matrix = f"f32[{GLOBAL_B},{GLOBAL_B}]"
  assert global_matrix in dense.lower(*args, *extra).compile().as_text()
  hlo = ring.lower(*args, *extra).compile().as_text()
  assert global_matrix not in hlo
  assert "collective-permute" in hlo


def test_sharded_loss_rejects_uneven_batch(mesh):
  x = jnp.ones((12, DIM))
  with pytest.raises(ValueError, match="12"):
    losses.clip_loss_sharded(x, x, jnp.float32(0.0), mesh)


def test_ctc_loss_matches_path_enumeration():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(3, 3, 11)).astype(np.float32)
  mask = np.array([[True, True, False], [True, True, True], [True, True, True]])
  digits = np.array([[3, -1], [1, 1], [5, 6]], np.int32)
  num_digits = np.array([1, 2, 2], np.int32)
  p = np.exp(_log_softmax(logits.astype(np.float64)))
  # sample 0: two frames, label (4): paths 44, 04, 40. sample 1: three frames, labels (2, 2): only path 2 0 2.
  nll0 = -np.log(p[0, 0, 4] * p[0, 1, 4] + p[0, 0, 0] * p[0, 1, 4] + p[0, 0, 4] * p[0, 1, 0])
  nll1 = -np.log(p[1, 0, 2] * p[1, 1, 0] * p[1, 2, 2]) / 2
  weight = np.array([1.0, 1.0, 0.0], np.float32)  # sample 2 is padding
  got = jax.jit(losses.ctc_loss)(logits, mask, digits, num_digits, weight)
  np.testing.assert_allclose(got, (nll0 + nll1) / 2, rtol=1e-4)


def test_digit_string_multilabel_and_softmax_losses():
  rng = np.random.RandomState(2)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
  digits = np.array([[4, 2, -1], [7, -1, -1]], np.int32)
  num_digits = np.array([2, 1], np.int32)
  logp = _log_softmax(logits.astype(np.float64))
  per_sample = [-(logp[0, 0, 4] + logp[0, 1, 2] + logp[0, 2, 10]) / 3,
                -(logp[1, 0, 7] + logp[1, 1, 10] + logp[1, 2, 10]) / 3]
  weight = np.array([2.0, 1.0], np.float32)
  np.testing.assert_allclose(jax.jit(losses.position_loss)(logits, digits, num_digits, weight),
                             (2 * per_sample[0] + per_sample[1]) / 3, rtol=1e-5)

  tags = rng.normal(size=(2, 10)).astype(np.float32)
  hot = np.zeros((2, 10))
  hot[0, [2, 4]] = hot[1, 7] = 1
  bce = -(hot * _log_sigmoid(tags) + (1 - hot) * _log_sigmoid(-tags)).mean(1)
  multilabel = jax.jit(losses.multilabel_loss)(tags, digits, weight)
  np.testing.assert_allclose(multilabel, (2 * bce[0] + bce[1]) / 3, rtol=1e-5)

  flat = logits[:, 0]
  labels = np.array([3, 9])
  ce = -_log_softmax(flat.astype(np.float64))[[0, 1], labels]
  softmax_ce = jax.jit(losses.softmax_ce)
  # A weight sum below 1 is clamped to 1.
  np.testing.assert_allclose(softmax_ce(flat, labels, np.array([0.0, 0.5])), ce[1] * 0.5, rtol=1e-5)
  np.testing.assert_allclose(softmax_ce(flat, labels), ce.mean(), rtol=1e-5)


def test_build_objective_heads_and_errors():
  heads, _ = objectives.build_objective({"contrastive/image-text": 1.0, "asr": 0.5, "pretrain/audio": 0.0, "vqa": 2})
  assert heads == ("embed", "vqa", "asr")
  with pytest.raises(ValueError, match="contrastive/image-smell"):
    objectives.build_objective({"contrastive/image-smell": 1.0})
  with pytest.raises(ValueError, match="captioning"):
    objectives.build_objective({"vqa": 1.0, "captioning": 0.0})
  with pytest.raises(ValueError, match="hinge"):
    objectives.build_objective({"vqa": 1.0}, loss_kind="hinge")


def _fake_outputs_and_batch(batch_size=4, max_digits=3):
  rng = np.random.RandomState(3)
  emb = {m: rng.normal(size=(batch_size, 8)).astype(np.float32) for m in ("image", "text")}
  emb = {m: e / np.linalg.norm(e, axis=1, keepdims=True) for m, e in emb.items()}
  outputs = {
      "embeddings": emb, "logit_scale": np.float32(1.0), "logit_bias": np.float32(-1.0),
      "present": {"image": np.ones(batch_size, bool), "text": np.ones(batch_size, bool)},
      "pretrain_logits": {"image": rng.normal(size=(batch_size, max_digits, 11)).astype(np.float32)},
      "vqa_logits": rng.normal(size=(batch_size, 5)).astype(np.float32),
      "fused_logits": rng.normal(size=(batch_size, max_digits, 11)).astype(np.float32),
  }
  digits = rng.randint(0, 10, (batch_size, max_digits)).astype(np.int32)
  num_digits = np.array([1, 2, 3, 1], np.int32)
  digits[np.arange(max_digits) >= num_digits[:, None]] = -1
  # Sample 0's fused prediction is made exactly right, so acc/fused is 1/3 of the real samples or more.
  outputs["fused_logits"][0] = 10.0 * np.eye(11)[np.where(digits[0] >= 0, digits[0], 10)]
  batch = {"digits": digits, "num_digits": num_digits, "answer": np.array([0, 1, 2, 3], np.int32),
           "string_id": np.array([0, 1, 1, 2], np.int32), "weight": np.array([1, 1, 1, 0], np.float32),
           "image_present": np.ones(batch_size, bool), "text_present": np.array([1, 1, 0, 1], bool)}
  return outputs, batch


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_objective_sums_weighted_terms_and_reports_them(loss_kind):
  spec = {"contrastive/image-text": 1.0, "pretrain/image": 0.5, "vqa": 2.0, "fused": 1.0}
  heads, objective = objectives.build_objective(spec, loss_kind=loss_kind)
  assert heads == ("embed", "pretrain", "vqa", "fused")
  outputs, batch = _fake_outputs_and_batch()
  total, metrics = jax.jit(objective)(outputs, batch)
  weighted = sum(w * metrics[f"loss/{k}"] for k, w in spec.items())
  np.testing.assert_allclose(total, weighted, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], total)
  # Contrastive term: only samples 0 and 1 have both modalities and weight > 0.
  kept = [0, 1]
  args = [jnp.asarray(outputs["embeddings"][m][kept]) for m in ("image", "text")]
  ids = jnp.asarray(batch["string_id"][kept])
  dense = (clip_loss(*args, 1.0, ids=ids) if loss_kind == "clip"
           else siglip_loss(*args, 1.0, -1.0, ids=ids))
  np.testing.assert_allclose(metrics["loss/contrastive/image-text"], dense, rtol=1e-5)
  vqa_right = (np.argmax(outputs["vqa_logits"], -1) == batch["answer"])[:3].mean()
  np.testing.assert_allclose(metrics["acc/vqa"], vqa_right, rtol=1e-6)
  assert metrics["acc/fused"] >= 1 / 3 - 1e-6
  assert set(metrics) >= {"acc/pretrain/image", "loss/vqa", "loss/fused", "loss/pretrain/image"}


def test_vqa_term_averages_the_extra_questions_with_the_sample_question():
  _, objective = objectives.build_objective({"vqa": 1.0})
  outputs, batch = _fake_outputs_and_batch()
  rng = np.random.default_rng(3)
  extra = rng.normal(size=(4, 2, outputs["vqa_logits"].shape[-1])).astype(np.float32)
  extra_answers = rng.integers(0, extra.shape[-1], (4, 2)).astype(np.int32)
  _, alone = objective(outputs, batch)
  _, both = objective({**outputs, "vqa_extra_logits": extra}, {**batch, "extra_answers": extra_answers})
  logits = np.concatenate([outputs["vqa_logits"][:, None], extra], 1)[:3]  # sample 3 has weight 0
  answers = np.concatenate([batch["answer"][:, None], extra_answers], 1)[:3]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, answers[..., None], -1).mean()
  np.testing.assert_allclose(both["loss/vqa"], expected, rtol=1e-5)
  assert abs(float(both["loss/vqa"]) - float(alone["loss/vqa"])) > 1e-3
  np.testing.assert_allclose(both["acc/vqa"], (logits.argmax(-1) == answers).mean(), rtol=1e-6)


def test_a_corrupted_modality_is_no_target_for_unimodal_and_contrastive_terms_but_still_for_fused():
  spec = {"pretrain/image": 1.0, "contrastive/image-text": 1.0, "vqa": 1.0, "fused": 1.0}
  _, objective = objectives.build_objective(spec)
  outputs, batch = _fake_outputs_and_batch()
  flagged = {**batch, "image_corrupted": np.array([False, True, False, False])}
  moved = {**outputs, "pretrain_logits": {"image": outputs["pretrain_logits"]["image"].copy()},
           "embeddings": {**outputs["embeddings"], "image": outputs["embeddings"]["image"].copy()},
           "fused_logits": outputs["fused_logits"].copy(), "vqa_logits": outputs["vqa_logits"].copy()}
  moved["pretrain_logits"]["image"][1] *= -3.0  # only sample 1's outputs change
  moved["vqa_logits"][1] *= -3.0
  moved["embeddings"]["image"][1] = -moved["embeddings"]["image"][1]
  moved["fused_logits"][1] *= -3.0
  (_, before), (_, after) = objective(outputs, flagged), objective(moved, flagged)
  for term in ("loss/pretrain/image", "loss/contrastive/image-text", "loss/vqa"):
    np.testing.assert_allclose(after[term], before[term], rtol=1e-6, err_msg=term)
  assert abs(float(after["loss/fused"]) - float(before["loss/fused"])) > 1e-3  # the joint task still reads it
  (_, plain_before), (_, plain_after) = objective(outputs, batch), objective(moved, batch)
  for term in ("loss/pretrain/image", "loss/contrastive/image-text", "loss/vqa"):  # unflagged, sample 1 counts
    assert abs(float(plain_after[term]) - float(plain_before[term])) > 1e-3, term
