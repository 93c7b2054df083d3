"""Data-parallel gradient mean with compressed communication, written out explicitly inside `jax.shard_map`.

Params are replicated (pure data parallelism); each data shard differentiates its local batch-mean loss. Only the
params the stage trains are communicated (`trained_leaves`: frozen, unused and routed-off params have no gradient),
flattened into one bucket per kind so the collective count stays small:
  none      psum / n in float32.
  bf16      bfloat16 all-to-all of the bucket (device j receives chunk j from everyone), float32 mean of the chunk,
            bfloat16 all-gather: 4 (n-1)/n bytes per element against 8 (n-1)/n for a float32 ring all-reduce. The
            bfloat16 travels bitcast to uint16: XLA:CPU compiles a bfloat16 psum, reduce-scatter, all-to-all or
            all-gather as float32 (see `bench comm`'s `backend_bf16_collectives`).
  int8      the same two phases in int8 with per-block absmax scales and error feedback on both: phase 1 quantises
            grad + residual before the all-to-all, phase 2 re-quantises the mean chunk (with its own residual)
            before the all-gather; about 2 (n-1)/n bytes per element. Per element, the first step's error is at
            most (mean_i absmax_i + absmax of the mean) / 254 of its block.
  powersgd  rank-r PowerSGD (Vogels et al. 2019) where low rank suits a tensor, int8 elsewhere: each tensor is
            viewed as its most square (rows, cols) split and goes low rank (one power iteration warm-started from
            the persistent Q, P and Q each a bfloat16 bucket sent as above, error feedback against the applied
            approximation) or through one int8 bucket as in `int8`. Vectors go int8; then, narrowest first (rank r
            holds the least of a narrow matrix's gradient), matrices move to int8 while the bytes stay within
            1/`target_ratio` of a float32 all-reduce of the trained gradients (`_powersgd_plan`).
Residuals are per device, stored as global arrays with a leading device dim sharded over the data axes, so they
survive jit, donation and checkpoints like any other state. Loss and aux come back as global means (integer
aux leaves, e.g. counts, as global sums).
"""

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import partial_eval as pe
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from crucible_jax.parallel.mesh import data_axes, num_data_shards

METHODS = ("none", "bf16", "int8", "powersgd")
TARGET_RATIO = 9.0  # PowerSGD's byte budget: this many times fewer than a float32 all-reduce of the trained grads


def default_compression_config() -> dict[str, Any]:
  """`config.compression`: the data-parallel gradient reduction (method one of METHODS; PowerSGD's rank and byte
  budget; elements per int8 scale)."""
  return dict(method="none", rank=4, target_ratio=TARGET_RATIO, block=256)
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def _check_method(method: str, mesh: Mesh) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown gradient compression {method!r}; choose one of {METHODS}")
  model_parallel = {a: mesh.shape[a] for a in ("fsdp", "tensor") if mesh.shape.get(a, 1) > 1}
  if method != "none" and model_parallel:
    raise ValueError(f"gradient compression {method!r} needs replicated params, but the mesh has {model_parallel}; "
                     "use fsdp=1, tensor=1 or compression 'none'")


def trained_leaves(loss_fn: LossFn, params: Any, batch: Any, mesh: Mesh) -> Any:
  """Bools shaped like `params`: True where the loss has a gradient, i.e. its JVP reads that tangent (dead-code
  elimination of the traced JVP); params cut by stop_gradient (frozen), unused by the objective or routed off are
  False. `batch` is the global batch (arrays or ShapeDtypeStructs), traced per data shard as the step runs it."""
  axes = data_axes()
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  params, batch = jax.tree.map(abstract, params), jax.tree.map(abstract, batch)

  def tangent(t, p, b):
    out = jax.jvp(lambda q: loss_fn(q, b, jax.random.key(0))[0], (p,), (t,))[1]
    return jax.lax.pmean(out, axes)

  mapped = jax.shard_map(tangent, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=P(), check_vma=False)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(mapped)(params, params, batch).jaxpr
  _, used = pe.dce_jaxpr(jaxpr, [True])
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, used[:len(leaves)])


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _selected(tree: Any, trained: Any | None) -> list[tuple[str, Any]]:
  """(path name, leaf) of every trained leaf, in flatten order; `trained=None` selects all."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  mask = [True] * len(flat) if trained is None else jax.tree.leaves(trained)
  if len(mask) != len(flat):
    raise ValueError(f"trained mask has {len(mask)} leaves but the params have {len(flat)}")
  return [(_path_name(path), leaf) for (path, leaf), keep in zip(flat, mask) if keep]


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The most square (rows, cols) split PowerSGD views a leaf of `shape` as; None for scalars and vectors."""
  splits = [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]
  return min(splits, key=sum) if splits else None


def _powersgd_plan(leaves: list[tuple[str, Any]], rank: int, block: int,
                   target_ratio: float) -> dict[str, tuple[int, int]]:
  """The (rows, cols) view of each leaf PowerSGD sends low rank; the others go int8.

  Costs per element, both phases alike: float32 4 bytes, a bfloat16 factor 2, int8 1 + 4/block (its scale). Every
  matrix whose rank-`rank` factors cost fewer bytes than its int8 form starts low rank; then, narrowest first, each
  moves to int8 if the total stays within 4 × (trained elements) / `target_ratio`.
  """
  int8 = 1 + 4 / block
  low, cost = {}, 0.0
  for name, leaf in leaves:
    size, matrix = math.prod(leaf.shape), _matrix_shape(tuple(leaf.shape))
    if matrix is not None and 2 * sum(matrix) * min(rank, *matrix) < int8 * size:
      low[name] = matrix
      cost += 2 * sum(matrix) * min(rank, *matrix)
    else:
      cost += int8 * size
  budget = 4 * sum(math.prod(leaf.shape) for _, leaf in leaves) / target_ratio
  for name, (rows, cols) in sorted(low.items(), key=lambda kv: (min(kv[1]), math.prod(kv[1]))):
    change = int8 * rows * cols - 2 * (rows + cols) * min(rank, rows, cols)
    if cost + change <= budget:
      del low[name]
      cost += change
  return low


def _bucket_sizes(num_elements: int, n: int, block: int) -> tuple[int, int]:
  """(padded bucket length, chunk length per device) of a bucket of `num_elements` in blocks of `block`."""
  padded = max(-(-num_elements // (block * n)), 1) * block * n
  return padded, padded // n


def _int8_shapes(leaves: list[tuple[str, Any]], n: int, block: int) -> dict[str, tuple[int, int]]:
  padded, chunk = _bucket_sizes(sum(math.prod(x.shape) for _, x in leaves), n, block)
  return {"error": (n, padded), "chunk_error": (n, chunk)}


def _state_shapes(params: Any, method: str, n: int, rank: int, block: int, trained: Any | None,
                  target_ratio: float) -> dict[str, Any]:
  """Shapes of the compression state: error buffers lead with the device dim n."""
  leaves = _selected(params, trained)
  if method == "int8":
    return _int8_shapes(leaves, n, block)
  if method == "powersgd":
    low = _powersgd_plan(leaves, rank, block, target_ratio)
    error = {name: (n, *leaf.shape) for name, leaf in leaves if name in low}
    q = {name: (cols, min(rank, rows, cols)) for name, (rows, cols) in low.items()}
    rest = [(name, leaf) for name, leaf in leaves if name not in low]
    return {"error": error, "q": q, "int8": _int8_shapes(rest, n, block)}
  return {}


def _state_specs(method: str) -> dict[str, Any]:
  int8 = {"error": P(data_axes()), "chunk_error": P(data_axes())}
  if method == "int8":
    return int8
  if method == "powersgd":
    return {"error": P(data_axes()), "q": P(), "int8": int8}
  return {}


def _error_sharding(mesh: Mesh) -> NamedSharding:
  """The spec jit gives the step's output (size-1 axes dropped), so feeding state back never recompiles."""
  split = tuple(axis for axis in data_axes() if mesh.shape[axis] > 1)
  return NamedSharding(mesh, P(split if len(split) > 1 else split[0]) if split else P())


def compression_state_shardings(params: Any, method: str, mesh: Mesh, *, trained: Any | None = None, rank: int = 4,
                                block: int = 256, target_ratio: float = TARGET_RATIO) -> dict[str, Any]:
  """Shardings of `init_compression_state`'s output, without allocating it (for jit out_shardings)."""
  shapes = _state_shapes(params, method, num_data_shards(mesh), rank, block, trained, target_ratio)
  errors, replicated = _error_sharding(mesh), NamedSharding(mesh, P())
  if method == "int8":
    return {k: errors for k in shapes}
  if method == "powersgd":
    return {"error": {k: errors for k in shapes["error"]}, "q": {k: replicated for k in shapes["q"]},
            "int8": {k: errors for k in shapes["int8"]}}
  return {}


def init_compression_state(params: Any, method: str, mesh: Mesh, *, trained: Any | None = None, rank: int = 4,
                           seed: int = 0, block: int = 256, target_ratio: float = TARGET_RATIO) -> dict[str, Any]:
  """Zero residuals (sharded over the data axes) and random PowerSGD Q (replicated) for the `trained` params
  (None: all); {} for none/bf16."""
  _check_method(method, mesh)
  shapes = _state_shapes(params, method, num_data_shards(mesh), rank, block, trained, target_ratio)
  errors = _error_sharding(mesh)
  zeros = lambda tree: {k: jnp.zeros(s, jnp.float32, device=errors) for k, s in tree.items()}
  state: dict[str, Any] = {}
  if method == "int8":
    state = zeros(shapes)
  elif method == "powersgd":
    keys = jax.random.split(jax.random.key(seed), max(len(shapes["q"]), 1))
    state = {
        "error": zeros(shapes["error"]),
        "q": {k: jax.device_put(jax.random.normal(key, s, jnp.float32), NamedSharding(mesh, P()))
              for key, (k, s) in zip(keys, shapes["q"].items())},
        "int8": zeros(shapes["int8"]),
    }
  return state


def _flatten(leaves: list[jax.Array], padded: int) -> jax.Array:
  """One float32 bucket of `leaves`, zero-padded to `padded` elements."""
  flat = jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in leaves]) if leaves else jnp.zeros((0,))
  return jnp.pad(flat, (0, padded - flat.size))


def _unflatten(flat: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
  """Split a bucket back into arrays shaped and typed like `like` (padding dropped)."""
  offsets = np.cumsum([0] + [math.prod(x.shape) for x in like])
  return [flat[a:b].reshape(x.shape).astype(x.dtype) for a, b, x in zip(offsets[:-1], offsets[1:], like)]


def _quantise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 values and float32 scales of x[..., block], one absmax scale per block."""
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(x / safe[..., None]), -127, 127).astype(jnp.int8)
  return values, scale


def _dequantise(values: jax.Array, scale: jax.Array) -> jax.Array:
  return values.astype(jnp.float32) * scale[..., None]


def _as_bits(x: jax.Array) -> jax.Array:
  """x rounded to bfloat16 and viewed as uint16: XLA:CPU compiles bfloat16 collectives in float32 (it moves the
  convert past them), but moves uint16 as is."""
  return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def _from_bits(bits: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)


def _bf16_mean(flat: jax.Array, n: int) -> jax.Array:
  """Mean over the data axes of a float32 bucket (length divisible by n), sent as bfloat16 in two phases."""
  axes = data_axes()
  chunks = jax.lax.all_to_all(_as_bits(flat.reshape(n, -1)), axes, 0, 0, tiled=True)
  chunk_mean = jnp.mean(_from_bits(chunks), axis=0)  # row i: my chunk as device i holds it
  return _from_bits(jax.lax.all_gather(_as_bits(chunk_mean), axes, tiled=True))


def _bf16_leaves(leaves: list[jax.Array], n: int) -> list[jax.Array]:
  """Means of `leaves` over the data axes through one bfloat16 bucket."""
  if not leaves:
    return []
  padded = _bucket_sizes(sum(math.prod(x.shape) for x in leaves), n, 1)[0]
  return _unflatten(_bf16_mean(_flatten(leaves, padded), n), leaves)


def _int8_leaves(leaves: list[jax.Array], state: dict[str, jax.Array], n: int,
                 block: int) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Means of `leaves` over the data axes, communicated as int8 (two phases, error feedback on both)."""
  axes = data_axes()
  wanted = _flatten(leaves, state["error"].shape[-1]) + state["error"][0]
  values, scale = _quantise(wanted.reshape(n, -1, block))
  error = wanted - _dequantise(values, scale).reshape(-1)
  values = jax.lax.all_to_all(values, axes, 0, 0, tiled=True)  # row i = my chunk, as device i quantised it
  scale = jax.lax.all_to_all(scale, axes, 0, 0, tiled=True)
  chunk_mean = jnp.mean(_dequantise(values, scale), axis=0) + state["chunk_error"][0].reshape(-1, block)
  values, scale = _quantise(chunk_mean)
  chunk_error = (chunk_mean - _dequantise(values, scale)).reshape(-1)
  values = jax.lax.all_gather(values, axes, tiled=True)
  scale = jax.lax.all_gather(scale, axes, tiled=True)
  mean = _unflatten(_dequantise(values, scale).reshape(-1), leaves)
  return mean, {"error": error[None], "chunk_error": chunk_error[None]}


def _pmean_bucket(arrays: list[jax.Array]) -> list[jax.Array]:
  """Float32 means over the data axes of `arrays`, as one all-reduce."""
  if not arrays:
    return []
  size = sum(math.prod(x.shape) for x in arrays)
  return _unflatten(jax.lax.pmean(_flatten(arrays, size), data_axes()), arrays)


def _powersgd_leaves(named: list[tuple[str, jax.Array]], state: dict[str, Any], n: int,
                     block: int) -> tuple[list[jax.Array], dict[str, Any]]:
  """Means of the named leaves over the data axes: low-rank PowerSGD with error feedback and warm-started Q
  for the leaves in `state["q"]` (P's, then Q's, each one bfloat16 bucket), one int8 bucket for the rest."""
  low = [i for i, (k, _) in enumerate(named) if k in state["q"]]
  rest = [i for i, (k, _) in enumerate(named) if k not in state["q"]]
  out: list[Any] = [None] * len(named)
  int8_state = state["int8"]
  if rest:
    rest_means, int8_state = _int8_leaves([named[i][1] for i in rest], int8_state, n, block)
    for i, mean in zip(rest, rest_means):
      out[i] = mean
  m = {i: (named[i][1].astype(jnp.float32) + state["error"][named[i][0]][0]).reshape(
      _matrix_shape(named[i][1].shape)) for i in low}
  p = {i: jnp.linalg.qr(x)[0] for i, x in zip(low, _bf16_leaves([m[i] @ state["q"][named[i][0]] for i in low], n))}
  error, new_q = {}, {}
  for i, q in zip(low, _bf16_leaves([m[i].T @ p[i] for i in low], n)):
    name, g = named[i]
    approx = p[i] @ q.T
    error[name] = (m[i] - approx).reshape(g.shape)[None]  # the mean residual is exactly what was not applied
    new_q[name] = q
    out[i] = approx.reshape(g.shape).astype(g.dtype)
  return out, {"error": error, "q": new_q, "int8": int8_state}


def _global_aux(aux: Any) -> Any:
  axes = data_axes()
  return jax.tree.map(
      lambda x: jax.lax.pmean(x, axes) if jnp.issubdtype(x.dtype, jnp.inexact)
      else jax.lax.psum(x.astype(jnp.int32), axes), aux)


def make_compressed_value_and_grad(loss_fn: LossFn, mesh: Mesh, method: str, *, trained: Any | None = None,
                                   rank: int = 4, block: int = 256, target_ratio: float = TARGET_RATIO
                                   ) -> Callable[..., tuple[tuple[jax.Array, Any], Any, Any]]:
  """fn(params, batch, comp_state, rng) -> ((loss, aux), grads, new_comp_state), grads = global mean.

  `loss_fn(params, batch, rng) -> (loss, aux)` sees the local batch shard and a per-shard rng. Only the `trained`
  params (a bool pytree from `trained_leaves`; None: all) are communicated; the others' gradients are zero.
  PowerSGD keeps its bytes within 1/`target_ratio` of a float32 all-reduce of the trained grads (`_powersgd_plan`).
  """
  _check_method(method, mesh)
  if rank < 1 or block < 1 or target_ratio <= 0:
    raise ValueError(f"rank, block and target_ratio must be positive, got rank={rank}, block={block}, "
                     f"target_ratio={target_ratio}")
  axes, n = data_axes(), num_data_shards(mesh)

  def local(params, batch, comp_state, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    flat, treedef = jax.tree.flatten(grads)
    keep = [True] * len(flat) if trained is None else jax.tree.leaves(trained)
    send = _selected(grads, trained)
    leaves = [g for _, g in send]
    if method == "none":
      means = _pmean_bucket(leaves)
    elif method == "bf16":
      means = _bf16_leaves(leaves, n)
    elif method == "int8":
      means, comp_state = _int8_leaves(leaves, comp_state, n, block)
    else:
      means, comp_state = _powersgd_leaves(send, comp_state, n, block)
    means = iter(means)
    # An untrained leaf's gradient is zero on every device: a constant zero, nothing sent.
    out = [next(means) if on else jnp.zeros(g.shape, g.dtype) for g, on in zip(flat, keep)]
    return (jax.lax.pmean(loss, axes), _global_aux(aux)), jax.tree.unflatten(treedef, out), comp_state

  specs = _state_specs(method)
  # Without replication checks autodiff stays per shard (no implicit psum of the replicated params' grads), and
  # scans that start from constants (optax's CTC) trace; each reduction here is explicit.
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), specs, P()),
                         out_specs=((P(), P()), P(), specs), check_vma=False)

  def value_and_grad(params, batch, comp_state, rng):
    expected = _state_shapes(params, method, n, rank, block, trained, target_ratio)
    actual = jax.tree.map(lambda x: tuple(x.shape), comp_state)
    if actual != expected:
      raise ValueError(f"comp_state does not fit method {method!r} (rank={rank}, block={block}, "
                       f"target_ratio={target_ratio}) "
                       f"and these params: "
                       f"got {actual}, expected {expected}; build it with init_compression_state")
    return mapped(params, batch, comp_state, rng)

  return value_and_grad


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}


def _array_bytes(dtype: str, dims: str) -> int:
  bits = _BITS.get(dtype, 8 if dtype.startswith("f8") else None)
  if bits is None:
    raise ValueError(f"collective_bytes: unknown HLO element type {dtype!r}")
  return int(np.prod([int(d) for d in dims.split(",") if d])) * bits // 8


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each collective kind in compiled HLO text (async pairs counted once, at -done)."""
  totals: dict[str, int] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match is None or match["suffix"] == "-start":
      continue
    size = sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(match["shape"]))
    totals[match["op"]] = totals.get(match["op"], 0) + size
  return totals
