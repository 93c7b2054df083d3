"""The edge side of an edge–cloud split: encode locally with an exported encoder, send only the embedding.

`EdgeClient(export_dir, url)` embeds a text or a file on this machine (serve.artifact + serve.preprocess, no model
code) and POSTs the vector to a `crucible serve` endpoint, which only searches. `crucible client` is its CLI.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from crucible_jax.serve import preprocess
from crucible_jax.serve.artifact import ExportDir


@dataclasses.dataclass
class Reply:
  """The server's answer and what the round trip cost."""

  body: dict[str, Any]
  bytes_sent: int  # request body bytes
  encode_ms: float  # local encoding (0 when the server encodes)
  round_trip_ms: float  # HTTP request to parsed reply


def post(url: str, body: bytes, content_type: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
  """(status, JSON reply) of a POST; HTTP errors return their status and JSON too."""
  headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
  request = urllib.request.Request(url, data=body, headers=headers, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


class EdgeClient:
  """Encodes queries locally and searches remotely by vector."""

  def __init__(self, export_dir: str | pathlib.Path, url: str, token: str | None = None):
    self.export, self.url, self.token = ExportDir(export_dir), url.rstrip("/"), token
    self.preprocessing = self.export.manifest["preprocessing"]

  def embed(self, text: str | None = None, data: bytes | None = None) -> np.ndarray:
    """The query's normalised embedding: a text, a file's bytes, or both (their mean, as the server does)."""
    parts = []
    if text is not None and text.strip():
      parts.append(("text", preprocess.text_inputs(text, self.preprocessing["text"])))
    if data:
      parts.append(preprocess.file_inputs(data, self.preprocessing))
    if not parts:
      raise preprocess.InputError("empty query: give a text or a file")
    vectors = [self.export.embed(m, inputs)[0] for m, inputs in parts]
    return np.mean([v / np.linalg.norm(v) for v in vectors], axis=0)

  def search(self, text: str | None = None, data: bytes | None = None, targets: Sequence[str] = (),
             k: int = 10) -> Reply:
    """Encode here, search there."""
    start = time.perf_counter()
    vector = self.embed(text, data)
    encoded = time.perf_counter()
    body = json.dumps({"vector": [round(float(x), 7) for x in vector], "targets": list(targets) or None,
                       "k": k}).encode()
    status, reply = post(f"{self.url}/search", body, "application/json", self.token)
    if status != 200:
      raise RuntimeError(f"search failed with HTTP {status}: {reply.get('error')}")
    done = time.perf_counter()
    return Reply(reply, len(body), 1e3 * (encoded - start), 1e3 * (done - encoded))


def run(args: argparse.Namespace, config: Any) -> int:
  """`crucible client`: one query encoded here, searched on the server; prints (or writes) the reply."""
  try:
    data = pathlib.Path(args.file).read_bytes() if args.file else None
    reply = EdgeClient(args.export, args.url, args.token).search(args.text, data, args.targets or (), args.k)
  except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  out = {**reply.body, "bytes_sent": reply.bytes_sent, "encode_ms": reply.encode_ms,
         "round_trip_ms": reply.round_trip_ms}
  text = json.dumps(out, indent=2)
  if args.json:
    pathlib.Path(args.json).write_text(text)
  print(text)
  return 0
