"""Dynamic modality routing: score modalities cheaply, encode only the chosen samples, scatter back.

Capacities are static (top-k over the batch), so a routed encoder compiles once and its FLOPs really drop.
Skipped samples come back masked, never as zero features pretending to be data.
"""

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from crucible_jax.common_types import BATCH, EMBED, MLP, MODALITIES, PATCH, VOCAB, present_key

Batch = Mapping[str, jax.Array]
EncodeFn = Callable[[Any], tuple[jax.Array, jax.Array]]
_EULER_GAMMA = 0.5772156649015329  # mean of a standard Gumbel; subtracted so the noise is zero-mean


def _dense(features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
  """Dense layer whose kernel and bias carry logical axis names."""
  return nn.Dense(
      features,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def _pool_grid(pixels: Float[Array, "... h w c"], grid: int) -> Float[Array, "... g g c"]:
  """Average-pool the spatial dims to grid x grid cells (trailing rows/cols that do not fill a cell are dropped)."""
  height, width = pixels.shape[-3], pixels.shape[-2]
  if height < grid or width < grid:
    raise ValueError(f"image/video of {height}x{width} pixels is smaller than the estimator grid {grid}")
  cropped = pixels[..., : grid * (height // grid), : grid * (width // grid), :]
  return einops.reduce(cropped, "... (g1 p) (g2 q) c -> ... g1 g2 c", "mean", g1=grid, g2=grid)


class ImportanceEstimator(nn.Module):
  """Scores how much each sample needs each modality from raw inputs, at a tiny fraction of the encoders' cost."""

  modalities: Sequence[str] = MODALITIES  # scored modalities, in `MODALITIES` order
  width: int = 32  # feature width of each stem
  grid: int = 4  # image/video are pooled to grid x grid cells
  audio_bins: int = 32  # audio RMS energy is pooled to this many bins
  text_buckets: int = 259  # text ids hash into this many buckets (any tokenizer; byte ids map one-to-one)

  @nn.compact
  def __call__(self, batch: Batch, present: Bool[Array, "batch modalities"]) -> Float[Array, "batch modalities"]:
    """Returns scores f32[B, M]; a modality absent from a sample contributes no features to it."""
    stems = {"image": self._image, "video": self._video, "audio": self._audio, "text": self._text}
    features = []
    for column, modality in enumerate(self.modalities):
      if modality not in stems or modality not in batch:
        raise ValueError(f"ImportanceEstimator scores {MODALITIES}; needs batch[{modality!r}] to score {modality!r}")
      raw = stems[modality](batch)
      hidden = nn.gelu(_dense(self.width, (PATCH, EMBED), f"{modality}_stem")(raw))
      hidden = nn.with_logical_constraint(hidden, (BATCH, EMBED))
      features.append(hidden * present[:, column, None])
    joint = jnp.concatenate(features + [present.astype(jnp.float32)], axis=-1)
    hidden = nn.gelu(_dense(self.width, (EMBED, MLP), "joint")(joint))
    scores = _dense(len(self.modalities), (MLP, None), "scores")(hidden)
    return nn.with_logical_constraint(scores, (BATCH, None))

  def _image(self, batch: Batch) -> jax.Array:
    """Coarse colour layout: the image pooled to a few cells."""
    image = batch["image"]
    if image.ndim != 4:
      raise ValueError(f"batch['image'] must be f32[B,H,W,C], got shape {image.shape}")
    return einops.rearrange(_pool_grid(image.astype(jnp.float32), self.grid), "b g1 g2 c -> b (g1 g2 c)")

  def _video(self, batch: Batch) -> jax.Array:
    """Appearance (mean pooled frame) and motion (mean absolute difference of pooled frames)."""
    video = batch["video"]
    if video.ndim != 5:
      raise ValueError(f"batch['video'] must be f32[B,F,H,W,C], got shape {video.shape}")
    frames = _pool_grid(video.astype(jnp.float32), self.grid)
    motion = jnp.abs(jnp.diff(frames, axis=1)).mean(axis=1) if frames.shape[1] > 1 else jnp.zeros_like(frames[:, 0])
    cells = jnp.concatenate([frames.mean(axis=1), motion], axis=-1)
    return einops.rearrange(cells, "b g1 g2 c -> b (g1 g2 c)")

  def _audio(self, batch: Batch) -> jax.Array:
    """Log RMS energy over `audio_bins` stretches of the waveform, ignoring samples past `audio_len`."""
    audio = batch["audio"]
    if audio.ndim != 2 or audio.shape[1] < self.audio_bins:
      raise ValueError(f"batch['audio'] must be f32[B,T] with T >= {self.audio_bins}, got shape {audio.shape}")
    hop = audio.shape[1] // self.audio_bins
    length = batch.get("audio_len", jnp.full(audio.shape[:1], audio.shape[1], jnp.int32))
    frames = audio[:, : hop * self.audio_bins].astype(jnp.float32).reshape(-1, self.audio_bins, hop)
    counts = jnp.clip(length[:, None] - hop * jnp.arange(self.audio_bins)[None, :], 0, hop)
    valid = jnp.arange(hop)[None, None, :] < counts[:, :, None]
    energy = jnp.where(valid, jnp.square(frames), 0.0).sum(-1) / jnp.maximum(counts, 1)
    has_signal = counts > 0
    log_rms = jnp.where(has_signal, 0.5 * jnp.log(energy + 1e-8), 0.0)
    return jnp.concatenate([log_rms, has_signal.astype(jnp.float32)], axis=-1)

  def _text(self, batch: Batch) -> jax.Array:
    """Bag of hashed byte embeddings over the non-padding tokens, plus the fill fraction."""
    text = batch["text"]
    if text.ndim != 2:
      raise ValueError(f"batch['text'] must be i32[B,L], got shape {text.shape}")
    embed = nn.Embed(
        self.text_buckets,
        self.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        name="text_bytes",
    )
    is_token = (text != 0)[..., None]
    bag = (embed(text % self.text_buckets) * is_token).sum(1) / jnp.maximum(is_token.sum(1), 1)
    return jnp.concatenate([bag, is_token.mean(1)], axis=-1)


@struct.dataclass
class ModalityRoute:
  """One modality's routing decision for a batch of B samples."""

  index: Int[Array, "capacity"]  # rows to encode, ascending; static length = capacity, capacity/groups per group
  selected: Bool[Array, "batch"]  # the sample's modality is encoded
  gate: Float[Array, "batch"]  # 1.0 where selected, 0 elsewhere; carries the straight-through gradient
  soft: Float[Array, "batch"]  # differentiable routing probability (0 where the modality is absent)
  groups: int = struct.field(pytree_node=False, default=1)  # contiguous batch blocks routed independently


@struct.dataclass
class RoutePlan:
  """Routing decisions for every routed modality, keyed by modality name; `plan[m]` is m's ModalityRoute."""

  index: dict[str, jax.Array]
  selected: dict[str, jax.Array]
  gate: dict[str, jax.Array]
  soft: dict[str, jax.Array]
  groups: int = struct.field(pytree_node=False, default=1)

  def __getitem__(self, modality: str) -> ModalityRoute:
    if modality not in self.index:
      raise KeyError(f"modality {modality!r} is not routed; routed: {sorted(self.index)}")
    return ModalityRoute(
        self.index[modality], self.selected[modality], self.gate[modality], self.soft[modality], self.groups)

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if m in self.index)


def _claim_slots(priority: jax.Array, present: jax.Array, capacity: Sequence[int], min_modalities: int) -> jax.Array:
  """Reserves capacity so every sample keeps its `min_modalities` best present modalities that still have room.

  Up to M rounds: each sample still short of `min_modalities` claims proposes its next-best present modality;
  each modality accepts its best-scoring proposers up to its remaining capacity. A sample therefore loses a
  preferred modality only to better-scoring claims, and ends with fewer claims only if every modality it carries
  is already full of other samples' claims (then no static-capacity plan could serve them all).
  """
  num_modalities = priority.shape[1]
  masked = jnp.where(present, priority, -jnp.inf)
  preference = jnp.argsort(-masked, axis=1)
  room = jnp.asarray(capacity, jnp.int32)
  claimed = jnp.zeros(priority.shape, bool)
  for rank in range(num_modalities if min_modalities > 0 else 0):
    choice = preference[:, rank]
    proposing = (claimed.sum(1) < min_modalities) & jnp.take_along_axis(present, choice[:, None], 1)[:, 0]
    proposals = jax.nn.one_hot(choice, num_modalities, dtype=bool) & proposing[:, None]
    order_key = jnp.where(proposals, masked, -jnp.inf)
    rank_in_modality = jnp.argsort(jnp.argsort(-order_key, axis=0, stable=True), axis=0)
    accepted = proposals & (rank_in_modality < room[None, :])
    claimed = claimed | accepted
    room = room - accepted.sum(0)
  return claimed


def _route_group(priority: jax.Array, present: jax.Array, capacity: tuple[int, ...], min_modalities: int) -> list:
  """(ascending local index, selected) per modality for one group: claimed samples first, then the top scores."""
  claimed = _claim_slots(priority, present, capacity, min_modalities)
  routes = []
  for column, slots in enumerate(capacity):
    key = jnp.where(claimed[:, column], jnp.inf, jnp.where(present[:, column], priority[:, column], -jnp.inf))
    top_values, top_index = jax.lax.top_k(key, slots)
    selected = jnp.zeros(key.shape, bool).at[top_index].set(top_values > -jnp.inf)
    routes.append((jnp.sort(top_index).astype(jnp.int32), selected))
  return routes


def plan_routes(
    scores: Float[Array, "batch modalities"],
    present: Bool[Array, "batch modalities"],
    capacity: Mapping[str, int],
    *,
    train: bool,
    rng: jax.Array | None,
    temperature: float = 1.0,
    min_modalities: int = 1,
    groups: int = 1,
) -> RoutePlan:
  """Picks at most `capacity[m]` present samples per modality (columns follow `MODALITIES` order of `capacity`).

  Training perturbs the scores with zero-mean Gumbel noise (top-k then samples without replacement, which
  explores); evaluation is deterministic. Gates are straight-through: forward 1/0, gradient of the soft score.
  `groups` splits the batch into contiguous blocks routed independently (capacity/groups each): set it to the
  number of data shards so gathers stay on-device instead of all-reducing the routed rows across the mesh.
  """
  modalities = [m for m in MODALITIES if m in capacity]
  unknown = sorted(set(capacity) - set(MODALITIES))
  if unknown or scores.shape[1] != len(modalities) or present.shape != scores.shape:
    raise ValueError(
        f"capacity keys {sorted(capacity)} (unknown: {unknown}) must match the {scores.shape[1]} score columns"
        f" and present of shape {present.shape}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  batch_size = scores.shape[0]
  if groups < 1 or batch_size % groups:
    raise ValueError(f"groups={groups} must divide the batch size {batch_size}")
  for m in modalities:
    if not 0 < capacity[m] <= batch_size or capacity[m] % groups:
      raise ValueError(f"capacity[{m!r}] = {capacity[m]} must be in [1, {batch_size}] and divisible by groups={groups}")
  if train:
    if rng is None:
      raise ValueError("plan_routes(train=True) needs an rng for the Gumbel noise")
    scores = scores + jax.random.gumbel(rng, scores.shape, scores.dtype) - _EULER_GAMMA
  present = present.astype(bool)
  priority = jax.lax.stop_gradient(scores)
  group_size, group_capacity = batch_size // groups, tuple(capacity[m] // groups for m in modalities)
  routes = jax.vmap(lambda p, q: _route_group(p, q, group_capacity, min_modalities))(
      priority.reshape(groups, group_size, -1), present.reshape(groups, group_size, -1))
  soft_all = jax.nn.sigmoid(scores / temperature) * present
  offsets = group_size * jnp.arange(groups, dtype=jnp.int32)[:, None]
  plan = {"index": {}, "selected": {}, "gate": {}, "soft": {}}
  for column, (m, (local_index, selected)) in enumerate(zip(modalities, routes)):
    selected, soft = selected.reshape(batch_size), soft_all[:, column]
    plan["index"][m] = (local_index + offsets).reshape(-1)
    plan["selected"][m] = selected
    # Parenthesised so the forward value is exactly `hard` (1.0 or 0.0), bit for bit.
    plan["gate"][m] = selected.astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))
    plan["soft"][m] = soft
  return RoutePlan(**plan, groups=groups)


def _local_index(index: jax.Array, groups: int, group_size: int) -> jax.Array:
  """Global ascending row indices i32[capacity] -> per-group offsets i32[groups, capacity/groups]."""
  return index.reshape(groups, -1) - group_size * jnp.arange(groups, dtype=index.dtype)[:, None]


def dispatch(tree: Any, index: Int[Array, "capacity"], groups: int = 1) -> Any:
  """Gathers the routed rows of every leaf, [B, ...] -> [capacity, ...], each group from its own block."""
  def gather(leaf: jax.Array) -> jax.Array:
    blocks = leaf.reshape(groups, -1, *leaf.shape[1:])
    rows = jax.vmap(lambda block, i: jnp.take(block, i, axis=0))(blocks, _local_index(index, groups, blocks.shape[1]))
    return rows.reshape(-1, *leaf.shape[1:])
  return jax.tree.map(gather, tree)


def combine(values: Any, index: Int[Array, "capacity"], batch_size: int, groups: int = 1) -> Any:
  """Scatters routed rows back, [capacity, ...] -> [B, ...], zeros (False) in the rows that were not routed."""
  group_size = batch_size // groups
  local = _local_index(index, groups, group_size)

  def scatter(leaf: jax.Array) -> jax.Array:
    rows = leaf.reshape(groups, -1, *leaf.shape[1:])
    def one(block_rows: jax.Array, i: jax.Array) -> jax.Array:
      return jnp.zeros((group_size,) + leaf.shape[1:], leaf.dtype).at[i].set(block_rows, unique_indices=True)
    return jax.vmap(one)(rows, local).reshape(batch_size, *leaf.shape[1:])
  return jax.tree.map(scatter, values)


def routed_encode(
    encode_fn: EncodeFn, inputs: Any, route: ModalityRoute
) -> tuple[Float[Array, "batch tokens width"], Bool[Array, "batch tokens"]]:
  """Runs `encode_fn` on the routed rows only and returns dense-shaped (tokens, mask) for fusion.

  Tokens are scaled by the gate (forward value 1) so the estimator gets the straight-through gradient; the mask
  is AND-ed with `selected`, so skipped samples reach fusion as masked. At capacity == B this is the dense path.
  """
  batch_size = route.selected.shape[0]
  if route.index.shape[0] == batch_size:  # every row is routed and the index is sorted: it is arange(B)
    tokens, mask = encode_fn(inputs)
  else:
    routed = encode_fn(dispatch(inputs, route.index, route.groups))
    tokens, mask = combine(routed, route.index, batch_size, route.groups)
  gate = route.gate.astype(tokens.dtype).reshape((batch_size,) + (1,) * (tokens.ndim - 1))
  selected = route.selected.reshape((batch_size,) + (1,) * (mask.ndim - 1))
  return tokens * gate, mask & selected


def budget_fractions(budget: float | Mapping[str, float], modalities: Sequence[str]) -> dict[str, float]:
  """A budget as {modality: fraction of the batch encoded}: one fraction for all, or exactly one per modality."""
  if hasattr(budget, "keys"):  # a dict or an ml_collections.ConfigDict
    budget = dict(budget.items())
    missing = [m for m in modalities if m not in budget]
    extra = sorted(set(budget) - set(modalities))
    if missing or extra:
      raise ValueError(f"budget {budget} must name exactly the modalities {list(modalities)}: missing {missing}, "
                       f"extra {extra}")
    fractions = {m: budget[m] for m in modalities}
  else:
    fractions = dict.fromkeys(modalities, budget)
  for m, fraction in fractions.items():
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
      raise ValueError(f"budget fraction for {m!r} is {fraction!r}; fractions must be in (0, 1]")
  return {m: float(f) for m, f in fractions.items()}


def capacities_for_budget(
    batch_size: int, budget: float | Mapping[str, float], modalities: Sequence[str], groups: int = 1
) -> dict[str, int]:
  """Static capacities: ceil(fraction * B / groups) * groups, at least one per group; fractions in (0, 1]."""
  if batch_size < 1 or groups < 1 or batch_size % groups:
    raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by groups={groups}")
  group_size = batch_size // groups
  return {m: groups * max(1, min(group_size, math.ceil(f * group_size - 1e-9)))
          for m, f in budget_fractions(budget, modalities).items()}


def routing_losses(plan: RoutePlan, present: Bool[Array, "batch modalities"], capacity: Mapping[str, int]) -> dict:
  """Budget loss (soft usage vs the achievable capacity fraction), balance loss (CV^2 of budget-relative
  soft usage across modalities, Shazeer et al. 2017's importance loss) and the hard usage per modality."""
  batch_size = present.shape[0]
  gaps, importance, usage = [], [], {}
  for column, m in enumerate(plan.modalities):
    soft_usage = plan.soft[m].mean()
    target = jnp.minimum(capacity[m], present[:, column].sum()) / batch_size
    gaps.append(jnp.square(soft_usage - target))
    importance.append(soft_usage * batch_size / capacity[m])
    usage[m] = plan.selected[m].mean(dtype=jnp.float32)
  importance = jnp.stack(importance)
  balance = importance.var() / (jnp.square(importance.mean()) + 1e-9)
  return {"budget_loss": jnp.stack(gaps).mean(), "balance_loss": balance, "usage": usage}


class ModalityRouter(nn.Module):
  """Estimator + budget controller: decides per batch which samples' modalities are worth encoding."""

  capacity_fraction: Mapping[str, float]  # modality -> fraction of the batch it may encode (1.0 = dense)
  temperature: float = 1.0  # softness of the straight-through sigmoid gate
  min_modalities: int = 1  # every sample keeps at least this many of its best present modalities (capacity allowing)
  width: int = 32  # estimator stem width
  grid: int = 4  # estimator image/video pooling grid
  audio_bins: int = 32  # estimator audio energy bins
  groups: int = 1  # batch blocks routed independently; set to the data-parallel shard count (see plan_routes)

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool) -> tuple[RoutePlan, dict]:
    """Returns the plan and aux = {budget_loss, balance_loss, usage[m], scores[m]}; training draws the 'routing' rng."""
    unknown = sorted(set(self.capacity_fraction) - set(MODALITIES))
    if unknown or not self.capacity_fraction:
      raise ValueError(f"capacity_fraction names unknown modalities {unknown} (known: {MODALITIES})")
    if self.min_modalities < 0:
      raise ValueError(f"min_modalities must be >= 0, got {self.min_modalities}")
    modalities = tuple(m for m in MODALITIES if m in self.capacity_fraction)
    missing = [m for m in modalities if m not in batch]
    if missing:
      raise ValueError(f"ModalityRouter routes {missing} but the batch lacks those keys")
    batch_size = batch[modalities[0]].shape[0]
    capacity = capacities_for_budget(batch_size, self.capacity_fraction, modalities, self.groups)
    # A batch without a `<m>_present` flag is taken to carry m in every sample.
    present = jnp.stack(
        [jnp.asarray(batch.get(present_key(m), jnp.ones((batch_size,), bool)), bool) for m in modalities], axis=1)
    scores = ImportanceEstimator(
        modalities=modalities, width=self.width, grid=self.grid, audio_bins=self.audio_bins, name="estimator"
    )(batch, present)
    rng = self.make_rng("routing") if train else None
    plan = plan_routes(
        scores, present, capacity, train=train, rng=rng, temperature=self.temperature,
        min_modalities=self.min_modalities, groups=self.groups)
    aux = routing_losses(plan, present, capacity)
    aux["scores"] = {m: scores[:, column] for column, m in enumerate(modalities)}  # noise-free, for routing/utility
    return plan, aux


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """Hashable, validated routing settings of a model (`routing_spec` makes it from `model.routing`)."""

  budget: tuple[tuple[str, float], ...]  # (modality, fraction of the batch encoded), active modalities only
  temperature: float = 1.0  # softness of the straight-through sigmoid gate
  min_modalities: int = 1  # modalities every sample keeps (capacity allowing)
  groups: int = 1  # batch blocks routed independently (the data-shard count)

  def router(self, name: str = "router") -> ModalityRouter:
    """The ModalityRouter these settings describe."""
    return ModalityRouter(dict(self.budget), temperature=self.temperature, min_modalities=self.min_modalities,
                          groups=self.groups, name=name)


def routing_spec(cfg: Mapping[str, Any] | None, modalities: Sequence[str]) -> RoutingSpec | None:
  """None when `cfg` is absent or `cfg.enabled` is false; else the validated spec (ValueError naming the key)."""
  if cfg is None or not cfg.get("enabled", False):
    return None
  budget = dict(cfg.get("budget", {}))
  missing = [m for m in modalities if m not in budget]
  if missing:
    raise ValueError(f"routing.budget lacks active modalities {missing} (has {sorted(budget)})")
  for m in modalities:
    if not 0.0 < float(budget[m]) <= 1.0:
      raise ValueError(f"routing.budget.{m}={budget[m]} must be in (0, 1]")
  temperature, min_modalities, groups = cfg.get("temperature", 1.0), cfg.get("min_modalities", 1), cfg.get("groups", 1)
  if not float(temperature) > 0:
    raise ValueError(f"routing.temperature={temperature} must be > 0")
  if isinstance(min_modalities, bool) or not isinstance(min_modalities, int) or min_modalities < 0:
    raise ValueError(f"routing.min_modalities={min_modalities!r} must be an integer >= 0")
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f"routing.groups={groups!r} must be a positive integer")
  return RoutingSpec(tuple((m, float(budget[m])) for m in modalities), float(temperature), min_modalities, groups)
