"""Contrastive losses (CLIP softmax, SigLIP sigmoid; dense and ring-chunked over devices) and task losses.

Everything is computed in f32. Per-sample `weight`/`valid` exclude padding and carry curriculum weights; each
loss divides by the weight sum clamped to >= 1.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from crucible_jax.models.heads import position_targets

_MASKED = -1e30  # finite stand-in for -inf: masked logsumexp stays NaN-free, also in gradients
_HIGHEST = jax.lax.Precision.HIGHEST  # B x B similarities are cheap; keep them exact on every backend

Weight = Float[Array, "batch"] | None
Valid = Bool[Array, "batch"] | None
Ids = Int[Array, "batch"] | None


def weighted_mean(values: Float[Array, "batch"], weight: Weight = None) -> Float[Array, ""]:
  """Sum of `values * weight` over the weight sum clamped to >= 1 (weight None = all ones)."""
  values = values.astype(jnp.float32)
  weight = jnp.ones_like(values) if weight is None else weight.astype(jnp.float32)
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _row_weights(size: int, valid: Valid, weight: Weight) -> Float[Array, "batch"]:
  """Per-row weight, zero where the row is invalid."""
  w = jnp.ones((size,), jnp.float32) if weight is None else weight.astype(jnp.float32)
  return w if valid is None else jnp.where(valid, w, 0.0)


def _similarities(a: Array, b: Array, scale: Array) -> Float[Array, "rows cols"]:
  return scale * jnp.einsum("id,jd->ij", a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)


def _positives(ids_rows: Array, ids_cols: Array, ok_rows: Array, ok_cols: Array) -> Bool[Array, "rows cols"]:
  return (ids_rows[:, None] == ids_cols[None, :]) & ok_rows[:, None] & ok_cols[None, :]


def _infonce_rows(logits: Array, ok_cols: Array, pos: Array) -> Float[Array, "rows"]:
  """Per-row softmax CE against the uniform distribution over that row's positives."""
  lse = jax.nn.logsumexp(jnp.where(ok_cols[None, :], logits, _MASKED), axis=1)
  pos_mean = jnp.sum(jnp.where(pos, logits, 0.0), axis=1) / jnp.maximum(jnp.sum(pos, axis=1), 1)
  return lse - pos_mean


def clip_loss(a: Float[Array, "batch dim"], b: Float[Array, "batch dim"], logit_scale: Float[Array, ""], *,
              valid: Valid = None, ids: Ids = None, weight: Weight = None) -> Float[Array, ""]:
  """Symmetric InfoNCE; with `ids`, every same-id pair is a positive (soft multi-positive targets)."""
  size = a.shape[0]
  w = _row_weights(size, valid, weight)
  ok = w > 0
  ids = jnp.arange(size) if ids is None else ids
  logits = _similarities(a, b, jnp.exp(jnp.asarray(logit_scale, jnp.float32)))
  pos = _positives(ids, ids, ok, ok)
  a_to_b = _infonce_rows(logits, ok, pos)
  b_to_a = _infonce_rows(logits.T, ok, pos.T)
  return 0.5 * (weighted_mean(a_to_b, w) + weighted_mean(b_to_a, w))


def _sigmoid_pair_rows(logits: Array, ok_cols: Array, pos: Array) -> Float[Array, "rows"]:
  """Per-row sum over valid columns of the SigLIP pair loss -log sigmoid(label * logit)."""
  pair = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
  return jnp.sum(jnp.where(ok_cols[None, :], pair, 0.0), axis=1)


def siglip_loss(a: Float[Array, "batch dim"], b: Float[Array, "batch dim"], logit_scale: Float[Array, ""],
                logit_bias: Float[Array, ""], *, valid: Valid = None, ids: Ids = None,
                weight: Weight = None) -> Float[Array, ""]:
  """Sigmoid loss: per row, the sum over all valid columns (positives and negatives), averaged over rows."""
  size = a.shape[0]
  w = _row_weights(size, valid, weight)
  ok = w > 0
  ids = jnp.arange(size) if ids is None else ids
  logits = _similarities(a, b, jnp.exp(jnp.asarray(logit_scale, jnp.float32))) + jnp.asarray(logit_bias, jnp.float32)
  return weighted_mean(_sigmoid_pair_rows(logits, ok, _positives(ids, ids, ok, ok)), w)


# ---- Ring-chunked versions: each device keeps its rows; the other side's chunks travel round the ring. ----


def _ring(mesh: Mesh, axes: Sequence[str], size: int) -> tuple[int, list[tuple[int, int]]]:
  """Ring length over `axes` and the one-step rotation; checks the batch splits evenly."""
  unknown = [ax for ax in axes if ax not in mesh.shape]
  if unknown:
    raise ValueError(f"mesh {dict(mesh.shape)} lacks batch axes {unknown}")
  n = 1
  for ax in axes:
    n *= mesh.shape[ax]
  if size % n:
    raise ValueError(f"batch {size} does not split over {n} devices of axes {tuple(axes)}")
  return n, [(i, (i + 1) % n) for i in range(n)]


def _sharded_inputs(mesh: Mesh, axes: Sequence[str], *arrays: Array) -> list[Array]:
  """Lay each array's batch axis over `axes`, as shard_map's in_specs require on an Explicit mesh."""
  sharding = NamedSharding(mesh, P(tuple(axes)))
  return [jax.sharding.reshard(x, sharding) if _is_explicit(mesh) else jax.lax.with_sharding_constraint(x, sharding)
          for x in arrays]


def _is_explicit(mesh: Mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _online_lse(acc: tuple, logits: Array, ok_cols: Array, pos: Array) -> tuple:
  """Fold one column chunk into per-row (running max, sum of exp, positive-logit sum, positive count)."""
  run_max, sum_exp, pos_sum, pos_count = acc
  masked = jnp.where(ok_cols[None, :], logits, _MASKED)
  # The max only shifts for stability; the result does not depend on it, so its gradient is dropped.
  new_max = jax.lax.stop_gradient(jnp.maximum(run_max, jnp.max(masked, axis=1)))
  sum_exp = sum_exp * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(masked - new_max[:, None]), axis=1)
  pos_sum = pos_sum + jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
  pos_count = pos_count + jnp.sum(pos, axis=1)
  return new_max, sum_exp, pos_sum, pos_count


def _infonce_from_acc(acc: tuple) -> Array:
  run_max, sum_exp, pos_sum, pos_count = acc
  return run_max + jnp.log(sum_exp) - pos_sum / jnp.maximum(pos_count, 1)


def _prepare(a, b, mesh, axes, valid, ids, weight):
  size = a.shape[0]
  n, perm = _ring(mesh, axes, size)
  w = _row_weights(size, valid, weight)
  ids = jnp.arange(size, dtype=jnp.int32) if ids is None else ids.astype(jnp.int32)
  return n, perm, _sharded_inputs(mesh, axes, a.astype(jnp.float32), b.astype(jnp.float32), w, ids)


def clip_loss_sharded(a: Float[Array, "batch dim"], b: Float[Array, "batch dim"], logit_scale: Float[Array, ""],
                      mesh: Mesh, axes: Sequence[str] = ("data", "fsdp"), *, valid: Valid = None, ids: Ids = None,
                      weight: Weight = None) -> Float[Array, ""]:
  """`clip_loss` with rows sharded over `axes`; no device materialises the global B x B logits."""
  axes = tuple(axes)
  n, perm, (a, b, w, ids) = _prepare(a, b, mesh, axes, valid, ids, weight)

  def local(a, b, w, ids, logit_scale):
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    ok = w > 0
    zero = jnp.zeros_like(w)
    empty = (zero + _MASKED, zero, zero, zero)

    def step(carry, _):
      # The b chunk travels with its column accumulators; after n hops both are back home, complete.
      row_acc, (b_c, ok_c, ids_c, col_acc) = carry
      logits = _similarities(a, b_c, scale)
      pos = _positives(ids, ids_c, ok, ok_c)
      row_acc = _online_lse(row_acc, logits, ok_c, pos)
      col_acc = _online_lse(col_acc, logits.T, ok, pos.T)
      travelling = jax.lax.ppermute((b_c, ok_c, ids_c, col_acc), axes, perm)
      return (row_acc, travelling), None

    (row_acc, (_, _, _, col_acc)), _ = jax.lax.scan(step, (empty, (b, ok, ids, empty)), length=n)
    total = jnp.sum(w * _infonce_from_acc(row_acc)) + jnp.sum(w * _infonce_from_acc(col_acc))
    total, weight_sum = jax.lax.psum((total, jnp.sum(w)), axes)
    return 0.5 * total / jnp.maximum(weight_sum, 1.0)

  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, P()), out_specs=P())(
      a, b, w, ids, jnp.asarray(logit_scale, jnp.float32))


def siglip_loss_sharded(a: Float[Array, "batch dim"], b: Float[Array, "batch dim"], logit_scale: Float[Array, ""],
                        logit_bias: Float[Array, ""], mesh: Mesh, axes: Sequence[str] = ("data", "fsdp"), *,
                        valid: Valid = None, ids: Ids = None, weight: Weight = None) -> Float[Array, ""]:
  """`siglip_loss` with rows sharded over `axes`; b chunks rotate round the ring, n-1 hops."""
  axes = tuple(axes)
  n, perm, (a, b, w, ids) = _prepare(a, b, mesh, axes, valid, ids, weight)

  def local(a, b, w, ids, logit_scale, logit_bias):
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    ok = w > 0

    def row_sums(b_c, ok_c, ids_c):
      logits = _similarities(a, b_c, scale) + jnp.asarray(logit_bias, jnp.float32)
      return _sigmoid_pair_rows(logits, ok_c, _positives(ids, ids_c, ok, ok_c))

    def step(carry, _):
      rows, chunk = carry
      chunk = jax.lax.ppermute(chunk, axes, perm)
      return (rows + row_sums(*chunk), chunk), None

    (rows, _), _ = jax.lax.scan(step, (row_sums(b, ok, ids), (b, ok, ids)), length=n - 1)
    total, weight_sum = jax.lax.psum((jnp.sum(w * rows), jnp.sum(w)), axes)
    return total / jnp.maximum(weight_sum, 1.0)

  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, P(), P()), out_specs=P())(
      a, b, w, ids, jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32))


# ---- Task losses. ----


def position_loss(logits: Float[Array, "batch positions classes"], labels: Int[Array, "batch positions"],
                  lengths: Int[Array, "batch"], weight: Weight = None) -> Float[Array, ""]:
  """Cross-entropy per position (mean over positions), target the end class (the last) past each length; weighted
  over samples."""
  targets = position_targets(labels, lengths, end=logits.shape[-1] - 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return weighted_mean(jnp.mean(ce, axis=1), weight)


def multi_hot(labels: Int[Array, "batch positions"], num_classes: int) -> Float[Array, "batch classes"]:
  """1 for every class the sequence contains (padding -1 matches nothing)."""
  return jnp.any(labels[:, :, None] == jnp.arange(num_classes), axis=1).astype(jnp.float32)


def multilabel_loss(tag_logits: Float[Array, "batch classes"], labels: Int[Array, "batch positions"],
                    weight: Weight = None) -> Float[Array, ""]:
  """Sigmoid BCE (mean over the classes) against the multi-hot of the labels a sequence holds."""
  bce = optax.sigmoid_binary_cross_entropy(tag_logits.astype(jnp.float32), multi_hot(labels, tag_logits.shape[-1]))
  return weighted_mean(jnp.mean(bce, axis=1), weight)


def softmax_ce(logits: Float[Array, "batch classes"], labels: Int[Array, "batch"],
               weight: Weight = None) -> Float[Array, ""]:
  """Weighted mean softmax cross-entropy with integer labels."""
  return weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels), weight)


def ctc_loss(logits: Float[Array, "batch frames classes"], logit_mask: Bool[Array, "batch frames"],
             digits: Int[Array, "batch max_digits"], num_digits: Int[Array, "batch"],
             weight: Weight = None) -> Float[Array, ""]:
  """CTC (blank 0, label d = class d+1), each sample's loss divided by its digit count; weighted mean.

  Samples without any valid frame are excluded (their CTC loss is meaningless).
  """
  label_ok = jnp.arange(digits.shape[1])[None, :] < num_digits[:, None]
  labels = jnp.where(label_ok, digits + 1, 0)
  per_sample = optax.ctc_loss(logits.astype(jnp.float32), (~logit_mask).astype(jnp.float32), labels,
                              (~label_ok).astype(jnp.float32), blank_id=0)
  per_sample = per_sample / jnp.maximum(num_digits, 1)
  w = jnp.ones(digits.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
  return weighted_mean(per_sample, jnp.where(jnp.any(logit_mask, axis=1), w, 0.0))
