"""`crucible serve`: cross-modal search over an index as an ASGI app (Starlette; uvicorn serves it).

Endpoints: `POST /search` (multipart: `text`, `file`, `vector`, `targets`, `k`, `deadline_ms`; or the same keys as
JSON), `GET /items/{id}` (the item's PNG/WAV/GIF/text), `GET /health`, `GET /metrics` (Prometheus), `GET /` (the
web page). A bearer token, when set, guards everything but `/health` and the page's static JS/CSS (header, or
`?token=` for the page, whose script then sends the header).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import pathlib
import sys
import time
import urllib.parse
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from crucible_jax.common_types import MODALITIES
from crucible_jax.serve import preprocess
from crucible_jax.serve.artifact import ExportDir
from crucible_jax.serve.metrics import Metrics
from crucible_jax.serve.priority import Priorities
from crucible_jax.serve.scheduler import Dropped, Encoding, Scheduler
from crucible_jax.serve.store import Index

STATIC = pathlib.Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/static/")  # the page's JS/CSS are the package's files, no data: a browser loads them bare


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Limits and scheduling of one service."""

  max_upload_bytes: int = 10 * 2**20  # request bodies above this get 413
  deadline_ms: float = 1000.0  # default per-request encoding deadline
  priorities: tuple[tuple[str, int], ...] | None = None  # (modality, priority), higher first; None = a routed
  # model's importance scores of each query's parts, else priority.DEFAULT_PRIORITIES
  max_batch: int = 16  # queries per encoder batch
  max_wait_ms: float = 2.0  # how long a batch waits to fill
  max_k: int = 100  # largest k a query may ask for
  token: str | None = None  # bearer token; None = open
  approximate: bool = False  # FAISS IVF search instead of exact
  nprobe: int = 16  # IVF lists probed per approximate query (more: higher recall, slower)


class HTTPError(Exception):
  def __init__(self, status: int, message: str, **extra: Any):
    super().__init__(message)
    self.status, self.message, self.extra = status, message, extra


class BearerAuth:
  """ASGI middleware: 401 unless `Authorization: Bearer TOKEN` (or `?token=TOKEN`), except on OPEN_PATHS."""

  def __init__(self, app: Any, token: str | None):
    self.app, self.token = app, token

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and self.token and not scope["path"].startswith(OPEN_PATHS):
      header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
      query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
      given = header[7:] if header.startswith("Bearer ") else query
      if not hmac.compare_digest(given.encode(), self.token.encode()):
        await JSONResponse({"error": "missing or wrong bearer token"}, 401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return
    await self.app(scope, receive, send)


async def _body(request: Request, limit: int) -> bytes:
  """The request body, or 413 as soon as it passes `limit` bytes."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise HTTPError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise HTTPError(413, f"upload exceeds the limit of {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


async def _fields(request: Request, limit: int) -> dict[str, Any]:
  """The query's fields from a JSON or multipart body (files as bytes)."""
  body = await _body(request, limit)
  kind = request.headers.get("content-type", "")
  if kind.startswith("application/json"):
    try:
      fields = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HTTPError(400, f"the JSON body does not parse: {e}") from e
    if not isinstance(fields, dict):
      raise HTTPError(400, "the JSON body must be an object")
    return fields

  async def replay() -> dict:
    return {"type": "http.request", "body": body, "more_body": False}

  try:
    form = await Request(request.scope, replay).form(max_part_size=limit)
  except Exception as e:  # python-multipart's errors are many; any of them is a malformed upload
    raise HTTPError(400, f"malformed form upload: {e}") from e
  fields: dict[str, Any] = {"targets": form.getlist("targets") or None}
  for key, value in form.multi_items():
    if key == "targets":
      continue
    fields[key] = await value.read() if isinstance(value, UploadFile) else value
  return fields


class SearchService:
  """The state behind the routes: index, encoders, scheduler, metrics."""

  def __init__(self, index: Index, config: ServeConfig):
    self.index, self.config, self.metrics = index, config, Metrics()
    self.export = ExportDir(index.export_dir)
    self.preprocessing = self.export.manifest["preprocessing"]
    self.priorities = Priorities(self.export, None if config.priorities is None else dict(config.priorities))
    defaults = {m: self.priorities.configured.get(m, 0.0) for m in self.export.modalities}
    self.scheduler = Scheduler(self.export.embed, defaults, config.max_batch, config.max_wait_ms / 1e3,
                               on_batch=self.metrics.on_batch)

  def _targets(self, fields: dict[str, Any]) -> list[str]:
    raw = fields.get("targets") or list(self.index.modalities())
    targets = [t.strip() for item in ([raw] if isinstance(raw, str) else raw) for t in str(item).split(",") if t.strip()]
    unknown = [t for t in targets if t not in MODALITIES]
    if unknown:
      raise HTTPError(400, f"unknown target modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
    if not targets:
      raise HTTPError(400, "no target modality selected")
    return targets

  def _k(self, fields: dict[str, Any]) -> int:
    try:
      k = int(fields.get("k", 10))
    except (TypeError, ValueError):
      raise HTTPError(400, f"k={fields.get('k')!r} is not an integer") from None
    if not 1 <= k <= self.config.max_k:
      raise HTTPError(400, f"k={k} must be between 1 and {self.config.max_k}")
    return k

  def _queries(self, fields: dict[str, Any]) -> tuple[list[tuple[str, dict]], np.ndarray | None]:
    """(modality, encoder inputs) of each query part, and a client-side embedding if one was sent."""
    parts, vector = [], None
    text = fields.get("text")
    if isinstance(text, str) and text.strip():
      parts.append(("text", preprocess.text_inputs(text, self.preprocessing["text"])))
    data = fields.get("file")
    if isinstance(data, (bytes, bytearray)) and data:
      parts.append(preprocess.file_inputs(bytes(data), self.preprocessing))
    if fields.get("vector") not in (None, ""):
      raw = fields["vector"]
      try:
        vector = np.asarray(json.loads(raw) if isinstance(raw, str) else raw, np.float32)
      except (ValueError, TypeError):
        raise HTTPError(400, "vector must be a JSON list of numbers") from None
      if vector.shape != (self.index.dim,) or not np.all(np.isfinite(vector)) or not np.any(vector):
        raise HTTPError(400, f"vector must be {self.index.dim} finite numbers, not all zero")
    if not parts and vector is None:
      raise HTTPError(400, "empty query: give a text, a file or a vector")
    for modality, _ in parts:
      if modality not in self.export.modalities:
        raise HTTPError(400, f"this model has no {modality} encoder")
    return parts, vector

  def warmup(self) -> None:
    """Compile every encoder for each batch bucket the scheduler can form (else the first queries pay for it)."""
    sizes = sorted({1 << i for i in range(max(self.config.max_batch - 1, 0).bit_length() + 1)})
    for modality in self.scheduler.priorities:
      spec = self.export.artifact(f"encoder_{modality}").inputs
      for size in sizes:
        self.export.embed(modality, {k: np.zeros((size, *v["shape"][1:]), v["dtype"]) for k, v in spec.items()})
    self.priorities.of([])  # compiles the router, when priorities come from it

  async def search(self, request: Request) -> JSONResponse:
    start = time.monotonic()
    fields = await _fields(request, self.config.max_upload_bytes)
    targets, k = self._targets(fields), self._k(fields)
    try:
      parts, vector = self._queries(fields)
    except preprocess.InputError as e:
      raise HTTPError(e.status, str(e)) from e
    deadline = start + float(fields.get("deadline_ms") or self.config.deadline_ms) / 1e3
    label = "+".join([m for m, _ in parts] + (["vector"] if vector is not None else []))
    ranks = self.priorities.of(parts)
    encoded = await asyncio.gather(*(self.scheduler.encode(m, inputs, deadline, ranks[m]) for m, inputs in parts),
                                   return_exceptions=True)
    failed = [e for e in encoded if isinstance(e, Exception) and not isinstance(e, Dropped)]
    if failed:
      raise failed[0]
    scheduling = {"dropped": [{"modality": e.modality, "reason": e.reason} for e in encoded if isinstance(e, Dropped)],
                  "deferred": [{"modality": m, "behind": list(e.deferred_behind)} for (m, _), e in zip(parts, encoded)
                               if isinstance(e, Encoding) and e.deferred_behind],
                  "priorities": ranks, "priority_source": self.priorities.source}
    dropped = scheduling["dropped"]
    for d in dropped:
      self.metrics.dropped.labels(d["modality"]).inc()
    vectors = [e.vector for e in encoded if isinstance(e, Encoding)] + ([vector] if vector is not None else [])
    if not vectors:
      raise HTTPError(503, "every query encoding was dropped to meet the deadline", modality=label, **scheduling)
    query = np.mean([v / np.linalg.norm(v) for v in vectors], axis=0)
    hits = self.index.search(query, targets, k, approximate=self.config.approximate, nprobe=self.config.nprobe)[0]
    meta = self.index.metadata(h.id for h in hits)
    results = [{**{c: meta[h.id][c] for c in ("id", "modality", "text", "path", "source", "source_row", "label")},
                "score": h.score, "url": f"/items/{h.id}"} for h in hits]
    elapsed = time.monotonic() - start
    self.metrics.latency.labels(label).observe(elapsed)
    return JSONResponse({"results": results, "query": label, "targets": targets, **scheduling,
                         "latency_ms": round(1e3 * elapsed, 3)}, headers={"x-query-modality": label})


def create_app(index: Index, config: ServeConfig = ServeConfig()) -> Starlette:
  """The ASGI app over an open index."""
  service = SearchService(index, config)

  def counted(endpoint: str, handler):
    async def route(request: Request) -> Response:
      try:
        response = await handler(request)
      except HTTPError as e:
        response = JSONResponse({"error": e.message, **e.extra}, e.status)
      except Exception as e:  # never take the server down; say what failed
        response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
      service.metrics.requests.labels(endpoint, response.headers.get("x-query-modality", ""),
                                      str(response.status_code)).inc()
      return response
    return route

  async def item(request: Request) -> Response:
    found = service.index.item(int(request.path_params["id"]))
    if found is None:
      raise HTTPError(404, f"no item {request.path_params['id']}")
    body = found["payload"] if found["payload"] is not None else (found["text"] or "").encode()
    return Response(body, media_type=found["mime"] or "application/octet-stream")

  async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "items": len(service.index), "modalities": list(service.index.modalities())})

  async def metrics(request: Request) -> Response:
    body, kind = service.metrics.render()
    return Response(body, media_type=kind.split(";")[0], headers={"content-type": kind})

  async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")

  @contextlib.asynccontextmanager
  async def lifespan(app: Starlette):
    service.scheduler.start()
    yield
    await service.scheduler.stop()

  app = Starlette(routes=[
      Route("/", counted("page", page)), Route("/health", counted("health", health)),
      Route("/metrics", counted("metrics", metrics)), Route("/search", counted("search", service.search), methods=["POST"]),
      Route("/items/{id:int}", counted("items", item)), Mount("/static", StaticFiles(directory=STATIC), name="static"),
  ], lifespan=lifespan, middleware=[Middleware(BearerAuth, token=config.token)] if config.token else [])
  app.state.service = service
  return app


def parse_priorities(spec: str | None) -> tuple[tuple[str, int], ...] | None:
  """"text=3,image=2" -> (("text", 3), ("image", 2)); None stays None; ValueError naming the bad part."""
  if spec is None:
    return None
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    if name not in MODALITIES or not value.lstrip("-").isdigit():
      raise ValueError(f"--priorities part {part!r} is not MODALITY=INTEGER with MODALITY in {', '.join(MODALITIES)}")
    out.append((name, int(value)))
  return tuple(out)


def run(args: Any, config: Any) -> int:
  """`crucible serve`: serve until interrupted; 1 (with the reason) when the index or an option is unusable."""
  try:
    serve_config = ServeConfig(
        max_upload_bytes=int(args.max_upload_mb * 2**20), deadline_ms=args.deadline_ms,
        priorities=parse_priorities(args.priorities), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        token=args.token or os.environ.get("CRUCIBLE_SERVE_TOKEN") or None, approximate=args.approximate,
        nprobe=args.nprobe)
    app = create_app(Index.open(args.index), serve_config)
  except (FileNotFoundError, ValueError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  if args.warmup:
    app.state.service.warmup()
  print(f"serving {args.index} on http://{args.host}:{args.port}/", flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0
