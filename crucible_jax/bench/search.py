"""`crucible bench search --workdir W --json OUT`: retrieval quality, serving latency and the 1M-vector index.

- quality: the model exported, DigitWorld's test split indexed (every item of every modality), mAP@10 (and R@1)
  for every query -> target modality pair; relevant = same digit string.
- latency: `crucible serve` in a subprocess, queried over loopback HTTP with encoding included, text and image
  queries at fixed offered loads (open loop), p50/p99, and saturation throughput (closed loop); on a 10k-item
  index (the test split plus synthetic vectors) and on a 1M-item synthetic-vector index, exact and FAISS IVF.
- recall@10 of the approximate search against exact on the 1M index; edge (vector) vs upload bytes and latency.
"""

import json
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from crucible_jax import inference
from crucible_jax.bench import search_load as load
from crucible_jax.eval.metrics import retrieval_metrics
from crucible_jax.serve import indexer, media
from crucible_jax.serve.client import EdgeClient, post
from crucible_jax.serve.export import export_model
from crucible_jax.serve.store import EXPORT_DIR, Index

QPS = (10, 50, 100)  # offered loads, queries/s
REQUESTS_PER_LEVEL = 200  # bounded: at most this many per load level, and at most SECONDS_PER_LEVEL of sending
SECONDS_PER_LEVEL = 5.0
SIZES = (10_000, 1_000_000)
QUERY_MODALITIES = ("text", "image")
LATENCY_TARGET = "image"  # latency queries search the images; synthetic filler vectors are images too


def _multipart(field: str, value: bytes | str, filename: str = "") -> tuple[bytes, str]:
  boundary = "crucibleboundary"
  disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
  data = value if isinstance(value, bytes) else value.encode()
  body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data +
          "".join(f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}"
                  for k, v in (("k", 10), ("targets", LATENCY_TARGET))).encode() + f"\r\n--{boundary}--\r\n".encode())
  return body, f"multipart/form-data; boundary={boundary}"


def _quality(index: Index) -> dict[str, Any]:
  meta = index.metadata(range(len(index)))
  labels = np.array([meta[i]["label"] for i in range(len(index))])
  modality = np.array([meta[i]["modality"] for i in range(len(index))])
  out = {}
  for q in index.modalities():
    for t in index.modalities():
      if q == t:
        continue
      qi, ti = np.flatnonzero(modality == q), np.flatnonzero(modality == t)
      scores = index._vectors[qi] @ index._vectors[ti].T
      metrics = retrieval_metrics(scores, labels[qi], labels[ti])
      out[f"{q}_to_{t}"] = {"mAP@10": metrics["mAP@10"], "R@1": metrics["R@1"], "queries": len(qi),
                            "candidates": len(ti)}
  return out


def _synthetic(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
  """Unit vectors around 1,000 random centres: clustered like real embeddings, unlike uniform noise."""
  centres = rng.standard_normal((1000, dim)).astype(np.float32)
  out = centres[rng.integers(0, 1000, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def _pad_index(path: pathlib.Path, source: Index, size: int, rng: np.random.Generator) -> Index:
  """A copy of `source`'s model with `size` items: its items first, then synthetic image vectors."""
  index = Index.create(path, source.dim)
  (path / EXPORT_DIR).symlink_to(source.export_dir.resolve())
  keep = min(size, len(source))
  meta = source.metadata(range(keep))
  for m in source.modalities():
    ids = [i for i in range(keep) if meta[i]["modality"] == m]
    index.add(m, source._vectors[ids], [{"label": meta[i]["label"], "text": meta[i]["text"]} for i in ids])
  for start in range(0, size - keep, 200_000):
    n = min(200_000, size - keep - start)
    index.add(LATENCY_TARGET, _synthetic(rng, n, source.dim), [{"source": "synthetic"}] * n)
  return index


def _load_levels(url: str, bodies: dict[str, list[tuple[bytes, str]]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for m, prepared in bodies.items():
    send = load.sender(url, prepared)
    for _ in range(5):  # warm: first requests pay for lazy set-up
      send(0)
    for qps in QPS:
      out.setdefault(m, {})[str(qps)] = load.open_loop(send, qps, min(REQUESTS_PER_LEVEL, int(qps * SECONDS_PER_LEVEL)))
    out[m]["saturation_qps"] = load.saturation(send)
  return out


def _recall(index: Index, queries: np.ndarray) -> dict[str, float]:
  timings, results = {}, {}
  for approximate in (False, True):
    index.search(queries[:1], [LATENCY_TARGET], 10, approximate=approximate)  # builds the FAISS index once
    start = time.perf_counter()
    results[approximate] = [index.search(q, [LATENCY_TARGET], 10, approximate=approximate)[0] for q in queries]
    timings[approximate] = 1e3 * (time.perf_counter() - start) / len(queries)
  recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(results[True], results[False])])
  return {"recall@10": float(recall), "exact_ms_per_query": timings[False], "approximate_ms_per_query": timings[True],
          "queries": len(queries)}


def _edge(url: str, export_dir: pathlib.Path, files: dict[str, list[bytes]]) -> dict[str, Any]:
  client, out = EdgeClient(export_dir, url), {}
  for m, payloads in files.items():
    edge, cloud = [], []
    for data in payloads:
      reply = client.search(data=data, targets=[LATENCY_TARGET], k=10)
      edge.append((reply.bytes_sent, reply.encode_ms + reply.round_trip_ms))
      body, kind = _multipart("file", data, f"query.{m}")
      start = time.perf_counter()
      post(f"{url}/search", body, kind)
      cloud.append((len(body), 1e3 * (time.perf_counter() - start)))
    out[m] = {"edge_bytes_per_query": float(np.mean([b for b, _ in edge])),
              "cloud_bytes_per_query": float(np.mean([b for b, _ in cloud])),
              "edge_p50_ms": float(np.median([t for _, t in edge])),
              "cloud_p50_ms": float(np.median([t for _, t in cloud])), "queries": len(payloads)}
  return out


def run_workdir(workdir: str, data: str = "digit_world:test", work: str | None = None) -> dict[str, Any]:
  """The whole benchmark for a trained run; one JSON-able dict (see the module docstring)."""
  root = pathlib.Path(work or tempfile.mkdtemp(prefix="bench_search_"))
  started = time.perf_counter()
  model = inference.load(workdir)
  export_model(model, root / "idx" / EXPORT_DIR)
  index = Index.create(root / "idx", model.config.model.joint_dim)
  counts = indexer.build(index, data, batch_size=64)
  report: dict[str, Any] = {"workdir": str(workdir), "data": data, "indexed": counts,
                            "quality": _quality(index), "latency": {}}
  meta = index.metadata(range(len(index)))
  texts = [meta[i]["text"] for i in range(len(index)) if meta[i]["modality"] == "text"][:100]
  images = [index.item(i)["payload"] for i in range(len(index)) if meta[i]["modality"] == "image"][:100]
  audio = [index.item(i)["payload"] for i in range(len(index)) if meta[i]["modality"] == "audio"][:20]
  bodies = {"text": [_multipart("text", t) for t in texts], "image": [_multipart("file", p, "q.png") for p in images]}
  rng = np.random.default_rng(0)
  for size in SIZES:
    padded = _pad_index(root / f"idx_{size}", index, size, rng)
    variants = (False, True) if size > 100_000 else (False,)
    for approximate in variants:
      with load.server(padded.path, QUERY_MODALITIES, approximate) as url:
        levels = _load_levels(url, bodies)
        if size == SIZES[0]:
          report["edge_cloud"] = _edge(url, index.export_dir, {"image": images[:20], "audio": audio})
      key = "latency" if not approximate else "latency_approximate"
      for m, by_qps in levels.items():
        report.setdefault(key, {}).setdefault(m, {})[str(size)] = by_qps
    if size > 100_000:
      report["index_1m"] = {"items": len(padded), **_recall(padded, _synthetic(rng, 200, padded.dim))}
  report["wall_s"] = time.perf_counter() - started
  return report
