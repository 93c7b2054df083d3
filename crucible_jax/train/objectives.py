"""Training objectives as data: a spec of weighted loss terms -> the heads they need and one loss function.

Spec keys (weight 0 = off) are `<task>[/<arg>]` of a registered task (`crucible_jax.tasks`: `contrastive/<a>-<b>`,
`vqa`, `tagging`, `asr`, `caption/<m>`, `imagine/<m>`; DigitWorld adds `pretrain/<m>` and `fused`), or the router's
`routing/budget`, `routing/balance`, `routing/utility` (need `model.routing.enabled`).
Every term's value is reported as `loss/<key>`, so a gradient-balancing scheme can read the per-term losses.
"""

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array

from crucible_jax import tasks
from crucible_jax.models.crucible import ALL_HEADS
from crucible_jax.models.heads import position_targets
from crucible_jax.tasks.registry import Batch, Outputs, TermFn
from crucible_jax.tasks.terms import modality_present, output, sample_weight
from crucible_jax.train import losses

ObjectiveFn = Callable[[Outputs, Batch], tuple[Array, dict[str, Array]]]


def _routing_term(name: str) -> TermFn:
  """The router's `<name>_loss` from `outputs['routing_aux']`; the budget term also reports per-modality usage."""
  def term(outputs, batch):
    if "routing_aux" not in outputs:
      raise ValueError(f"objective term 'routing/{name}' needs model output 'routing_aux': set model.routing.enabled")
    aux = outputs["routing_aux"]
    extra = {f"routing/usage_{m}": u for m, u in aux["usage"].items()} if name == "budget" else {}
    return aux[f"{name}_loss"], extra
  return term


def _routing_utility_term(outputs, batch):
  """Teaches the router's estimator what each encoded modality is worth to this sample: sigmoid(score) regresses,
  by binary cross-entropy, the probability that the modality's own pretrain head names the digits (exp of minus its
  per-position CE, held constant). A modality that cannot be read (blank, noise, a caption of other digits) earns a
  low score and gives its capacity to a sample that needs it."""
  if "routing_aux" not in outputs:
    raise ValueError("objective term 'routing/utility' needs model output 'routing_aux': set model.routing.enabled")
  scores, logits = outputs["routing_aux"]["scores"], output(outputs, "pretrain_logits", "routing/utility")
  terms, metrics = [], {}
  for m, score in scores.items():
    targets = position_targets(batch["digits"], batch["num_digits"], end=logits[m].shape[-1] - 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[m].astype(jnp.float32), targets).mean(axis=1)
    utility = jax.lax.stop_gradient(jnp.exp(-ce))
    weight = sample_weight(batch) * modality_present(outputs, batch, m)  # encoded samples only: others had no read-out
    terms.append(losses.weighted_mean(optax.sigmoid_binary_cross_entropy(score.astype(jnp.float32), utility), weight))
    metrics[f"routing/utility_{m}"] = losses.weighted_mean(utility, weight)
  return jnp.mean(jnp.stack(terms)), metrics


_ROUTING: dict[str, tuple[str | None, TermFn]] = {
    # The router runs with any head, so its plan's terms ask for none.
    "routing/budget": (None, _routing_term("budget")), "routing/balance": (None, _routing_term("balance")),
    "routing/utility": ("pretrain", _routing_utility_term)}


def _parse_term(key: str, ctx: tasks.TermContext) -> tuple[str | None, TermFn]:
  """(head, term function) for one spec key; ValueError naming the key if it is not understood."""
  if key in _ROUTING:
    return _ROUTING[key]
  try:
    task, arg = tasks.task_of_term(key)
    task.modalities(arg)  # checks the arg
  except ValueError as e:
    raise ValueError(f"unknown objective term {key!r}: {e}; or one of {sorted(_ROUTING)}") from None
  if task.term is None:
    raise ValueError(f"objective term {key!r}: task {task.name!r} has no loss (it only evaluates)")
  return task.head, task.term(arg, key, ctx)


def build_objective(spec: Mapping[str, float], *, loss_kind: str = "clip", mesh: Mesh | None = None,
                    batch_axes: Sequence[str] = ("data", "fsdp"), reference_glyphs: np.ndarray | None = None,
                    gather_axes: Sequence[str] = ()) -> tuple[tuple[str, ...], ObjectiveFn]:
  """The model heads a weighted sum of loss terms needs, and fn(outputs, batch) -> (loss, metrics).

  With `mesh`, contrastive terms use the ring-chunked losses over `batch_axes` (call fn under jit); with
  `gather_axes` (fn runs per shard inside a shard_map over them), contrastive terms all-gather the shards'
  embeddings and score the global batch; with `reference_glyphs` (a source's, `tasks.source_extras`), `imagine/<m>`
  terms draw the label sequence in that reference hand instead of the sample's image.
  """
  if loss_kind not in tasks.LOSS_KINDS:
    raise ValueError(f"loss_kind {loss_kind!r} is not one of {tasks.LOSS_KINDS}")
  ctx = tasks.TermContext(loss_kind, mesh, tuple(batch_axes), tuple(gather_axes), reference_glyphs)
  terms, used_heads = [], set()
  for key, weight in spec.items():
    head, fn = _parse_term(key, ctx)
    weight = float(weight)
    if weight < 0:
      raise ValueError(f"objective term {key!r} has negative weight {weight}")
    if weight > 0:
      terms.append((key, weight, fn))
      used_heads.add(head)
  if not terms:
    raise ValueError(f"objective spec {dict(spec)} has no term with a positive weight")

  def objective(outputs: Outputs, batch: Batch) -> tuple[Array, dict[str, Array]]:
    total, metrics = jnp.zeros((), jnp.float32), {}
    for key, weight, fn in terms:
      loss, extra = fn(outputs, batch)
      metrics[f"loss/{key}"] = loss
      metrics.update(extra)
      total = total + weight * loss
    metrics["loss"] = total
    return total, metrics

  return tuple(h for h in ALL_HEADS if h in used_heads), objective
