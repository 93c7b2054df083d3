"""What makes a checkpoint trustworthy: a manifest of its files' checksums, and a state that is finite."""

import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST = "crucible_manifest.json"
CHECKSUMMED_MARK = "crucible_checksummed.json"  # in checkpoints/: {"from_step": N}, steps ≥ N carry manifests


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: pathlib.Path) -> None:
  """Record size and sha256 of every file of a committed step directory (atomically: rename into place)."""
  files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(step_dir)}
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
  tmp.replace(step_dir / MANIFEST)


def mark_checksummed(directory: pathlib.Path, step: int) -> None:
  """Record once in a checkpoints directory that every step from `step` on is saved with a manifest."""
  mark = directory / CHECKSUMMED_MARK
  if mark.is_file():
    return
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".{CHECKSUMMED_MARK}.tmp"
  tmp.write_text(json.dumps({"from_step": step}))
  tmp.replace(mark)


def checksummed_from(directory: pathlib.Path) -> int | None:
  """The first step saved with a manifest in `directory`, None for a directory of code that wrote no mark."""
  mark = directory / CHECKSUMMED_MARK
  if not mark.is_file():
    return None
  try:
    return int(json.loads(mark.read_text())["from_step"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{mark}: unreadable ({e}); it should hold {{\"from_step\": N}}") from e


def has_manifest(step_dir: pathlib.Path) -> bool:
  return (step_dir / MANIFEST).is_file()


def verify(step_dir: pathlib.Path) -> str | None:
  """None when every file matches the manifest, else what is wrong, naming the file."""
  try:
    listed = json.loads((step_dir / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{step_dir / MANIFEST}: unreadable manifest ({e})"
  for name, want in sorted(listed.items()):
    path = step_dir / name
    if not path.is_file():
      return f"{path}: missing"
    if path.stat().st_size != want["bytes"]:
      return f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']}"
    if _sha256(path) != want["sha256"]:
      return f"{path}: sha256 differs from the manifest (the bytes were changed)"
  return None


@jax.jit
def _finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` holding a NaN or inf (one reduction on device, one fetch)."""
  flat = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return []
  finite = _finite_per_leaf([x for _, x in flat])
  finite = np.asarray(finite.addressable_data(0))  # replicated: every process holds the whole vector
  return [path for (path, _), ok in zip(flat, finite) if not ok]


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays in `tree`: about what a checkpoint of it needs on disk."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
