"""An embedding index on disk: vectors in .npy chunks, item metadata and payloads in SQLite, exact or FAISS search.

Layout of an index directory: `index.json` (dimension), `vectors/NNNNNN.npy` (one chunk per `add`, rows in id order),
`items.sqlite` (table `items`: id = vector row, modality, text, path, source, source_row, label, mime, payload) and
`export/` (the model that embedded it). A chunk is written before its rows are committed; on reopening, vectors
beyond the committed rows (an interrupted `add`) are ignored.
"""

import dataclasses
import json
import math
import pathlib
import sqlite3
from typing import Any, Iterable, Sequence

import numpy as np

INDEX_FILE = "index.json"
DB_FILE = "items.sqlite"
VECTORS_DIR = "vectors"
EXPORT_DIR = "export"
APPROXIMATE_MIN_ITEMS = 4096  # below this an approximate index is no faster than exact search: use exact
SCHEMA = """CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY, modality TEXT NOT NULL, text TEXT, path TEXT, source TEXT, source_row INTEGER,
  label INTEGER, mime TEXT, payload BLOB)"""
COLUMNS = ("modality", "text", "path", "source", "source_row", "label", "mime", "payload")


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result: item id, cosine score, modality."""

  id: int
  score: float
  modality: str


class Index:
  """Vectors and metadata of one collection; `search` over chosen target modalities."""

  def __init__(self, path: str | pathlib.Path, dim: int):
    self.path, self.dim = pathlib.Path(path), int(dim)
    self._db = sqlite3.connect(self.path / DB_FILE, check_same_thread=False)
    self._db.execute(SCHEMA)
    count = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    chunks = [np.load(p) for p in sorted((self.path / VECTORS_DIR).glob("*.npy"))]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
    if len(vectors) < count:
      raise ValueError(f"{self.path}: {count} items but only {len(vectors)} vectors; the index is damaged")
    self._vectors = vectors[:count]
    self._modality = np.array([m for (m,) in self._db.execute("SELECT modality FROM items ORDER BY id")], object)
    self._chunks = len(chunks)
    self._by_modality: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._approximate: dict[str, Any] = {}

  @classmethod
  def create(cls, path: str | pathlib.Path, dim: int) -> "Index":
    """A new empty index at `path` (a new directory, or one holding only its model's `export/`)."""
    path = pathlib.Path(path)
    if path.exists() and set(p.name for p in path.iterdir()) - {EXPORT_DIR}:
      raise FileExistsError(f"{path} exists and is not empty; choose a new --out directory")
    (path / VECTORS_DIR).mkdir(parents=True, exist_ok=True)
    (path / INDEX_FILE).write_text(json.dumps({"dim": int(dim), "format": 1}))
    return cls(path, dim)

  @classmethod
  def open(cls, path: str | pathlib.Path) -> "Index":
    """An existing index."""
    file = pathlib.Path(path) / INDEX_FILE
    if not file.is_file():
      raise FileNotFoundError(f"{file} not found: {path} is not a crucible index (build one with `crucible index`)")
    return cls(path, json.loads(file.read_text())["dim"])

  def __len__(self) -> int:
    return len(self._vectors)

  @property
  def export_dir(self) -> pathlib.Path:
    return self.path / EXPORT_DIR

  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(set(self._modality.tolist())))

  def add(self, modality: str, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Append items of one modality (vectors [n, dim], one metadata record each); returns their ids."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(records):
      raise ValueError(f"add: vectors {vectors.shape} must be [len(records)={len(records)}, dim={self.dim}]")
    start = len(self)
    np.save(self.path / VECTORS_DIR / f"{self._chunks:06d}.npy", vectors)
    rows = [(start + i, modality, *(r.get(c) for c in COLUMNS[1:])) for i, r in enumerate(records)]
    with self._db:
      self._db.executemany(f"INSERT INTO items (id, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * 9)})", rows)
    self._chunks += 1
    self._vectors = np.concatenate([self._vectors, vectors])
    self._modality = np.concatenate([self._modality, np.array([modality] * len(vectors), object)])
    self._by_modality.pop(modality, None)
    self._approximate.pop(modality, None)
    return np.arange(start, start + len(vectors))

  def item(self, item_id: int) -> dict[str, Any] | None:
    """Metadata and payload of one item, or None."""
    row = self._db.execute(f"SELECT id, {', '.join(COLUMNS)} FROM items WHERE id = ?", (int(item_id),)).fetchone()
    return None if row is None else dict(zip(("id", *COLUMNS), row))

  def metadata(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Metadata (no payload) of several items, by id."""
    ids = [int(i) for i in ids]
    columns = ("id", *COLUMNS[:-1])
    rows = self._db.execute(f"SELECT {', '.join(columns)} FROM items WHERE id IN ({', '.join('?' * len(ids))})", ids)
    return {row[0]: dict(zip(columns, row)) for row in rows}

  def _rows(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
    if modality not in self._by_modality:
      ids = np.flatnonzero(self._modality == modality)
      self._by_modality[modality] = (ids, np.ascontiguousarray(self._vectors[ids]))
    return self._by_modality[modality]

  def _faiss(self, modality: str, nprobe: int) -> Any:
    import faiss  # deferred: exact search and opening an index do not need it
    if modality not in self._approximate:
      ids, vectors = self._rows(modality)
      nlist = max(1, int(math.sqrt(len(ids))))  # sqrt(n) lists: 1,000 for a million vectors
      quantizer = faiss.IndexFlatIP(self.dim)
      index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
      sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: 64 * nlist]]  # k-means on a sample
      index.train(sample)
      index.add(vectors)
      self._approximate[modality] = (index, quantizer)
    index = self._approximate[modality][0]
    index.nprobe = nprobe
    return index

  def search(self, queries: np.ndarray, targets: Sequence[str], k: int, approximate: bool = False,
             nprobe: int = 16) -> list[list[Hit]]:
    """Top-k items among `targets` by cosine score for each query [n, dim] (or [dim]), best first."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != self.dim:
      raise ValueError(f"query vectors have {queries.shape[1]} dims, the index {self.dim}")
    candidates: list[tuple[np.ndarray, np.ndarray, str]] = []
    for target in targets:
      ids, vectors = self._rows(target)
      if not len(ids):
        continue
      top = min(k, len(ids))
      if approximate and len(ids) >= APPROXIMATE_MIN_ITEMS:
        scores, rows = self._faiss(target, nprobe).search(queries, top)
        scores, rows = np.where(rows >= 0, scores, -np.inf), np.maximum(rows, 0)  # -1: fewer hits than k
      else:
        all_scores = queries @ vectors.T
        rows = np.argpartition(-all_scores, top - 1, axis=1)[:, :top]
        scores = np.take_along_axis(all_scores, rows, axis=1)
      candidates.append((ids[rows], scores, target))
    results = []
    for q in range(len(queries)):
      hits = [Hit(int(i), float(s), t) for ids, scores, t in candidates for i, s in zip(ids[q], scores[q])
              if np.isfinite(s)]
      results.append(sorted(hits, key=lambda h: -h.score)[:k])
    return results

  def close(self) -> None:
    self._db.close()
