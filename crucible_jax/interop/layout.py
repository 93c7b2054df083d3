"""PyTorch weight layouts → crucible's: a strict reader of a state dict and the per-layer transposes."""

from typing import Callable

import numpy as np

from crucible_jax.interop.checkpoints import StateDict

Params = dict
BUFFER_SUFFIXES = ("position_ids", "attn_mask")  # non-weight buffers some exports keep


class Reader:
  """Takes weights out of a state dict by name; `leftover()` is what no mapping took (a wrong architecture)."""

  def __init__(self, state: StateDict, source: str):
    self._state, self._source, self._taken = state, source, set()

  def __call__(self, key: str) -> np.ndarray:
    if key not in self._state:
      near = sorted(k for k in self._state if k.split(".")[0] == key.split(".")[0])[:5]
      raise ValueError(f"{self._source} checkpoint lacks {key!r} (keys like it: {near})")
    self._taken.add(key)
    return self._state[key]

  def has(self, key: str) -> bool:
    return key in self._state

  def count(self, fmt: str) -> int:
    """How many consecutive i have `fmt.format(i=i)` in the state dict (blocks of a tower)."""
    i = 0
    while fmt.format(i=i) in self._state:
      i += 1
    return i

  def check_all_taken(self) -> None:
    """ValueError listing weights no mapping read: the checkpoint holds more than the converted model."""
    left = sorted(k for k in self._state if k not in self._taken and not k.endswith(BUFFER_SUFFIXES))
    if left:
      raise ValueError(f"{self._source} checkpoint has {len(left)} weights the conversion does not use "
                       f"(another architecture?): {left[:8]}{'...' if len(left) > 8 else ''}")


def linear(r: Reader, prefix: str, bias: bool = True) -> Params:
  """torch Linear [out, in] → Dense kernel [in, out] (+ bias)."""
  out = {"kernel": r(f"{prefix}.weight").T}
  if bias:
    out["bias"] = r(f"{prefix}.bias")
  return out


def norm(r: Reader, prefix: str) -> Params:
  return {"scale": r(f"{prefix}.weight"), "bias": r(f"{prefix}.bias")}


def _heads(w: np.ndarray, b: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
  """[out, in] weight, [out] bias of one q/k/v projection → kernel [in, heads, head_dim], bias [heads, head_dim]."""
  return w.T.reshape(w.shape[1], heads, -1), b.reshape(heads, -1)


def attention(qkv: list[tuple[np.ndarray, np.ndarray]], out_w: np.ndarray, out_b: np.ndarray, heads: int,
              names: tuple[str, ...] = ("qkv",)) -> Params:
  """q, k, v (weight, bias) pairs → MultiHeadAttention params; `names` ("qkv",) fuses all, ("query", "kv") splits."""
  split = [_heads(w, b, heads) for w, b in qkv]
  groups = [split] if names == ("qkv",) else [split[:1], split[1:]]
  params = {}
  for name, group in zip(names, groups):
    stacked = len(group) > 1
    params[name] = {"kernel": np.stack([k for k, _ in group], 1) if stacked else group[0][0],
                    "bias": np.stack([b for _, b in group], 0) if stacked else group[0][1]}
  params["out"] = {"kernel": out_w.T.reshape(heads, -1, out_w.shape[0]), "bias": out_b}
  return params


def fused_in_proj(r: Reader, prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """torch.nn.MultiheadAttention's in_proj_weight/bias [3w, w] as q, k, v (weight, bias) pairs."""
  return list(zip(np.split(r(f"{prefix}.in_proj_weight"), 3), np.split(r(f"{prefix}.in_proj_bias"), 3)))


def patch_kernel(conv: np.ndarray) -> np.ndarray:
  """Conv2d weight [width, c, ph, pw] → the patch Dense kernel [(ph pw c), width] of ImageEncoder's patch order."""
  return conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])


def transformer(r: Reader, block: Callable[[Reader, str, int], Params], fmt: str, depth: int, heads: int,
                final_norm: str) -> Params:
  """`depth` blocks named by `fmt` (with {i}) and the final LayerNorm → a crucible Transformer's params."""
  out = {f"block_{i}": block(r, fmt.format(i=i), heads) for i in range(depth)}
  out["ln_final"] = norm(r, final_norm)
  return out
