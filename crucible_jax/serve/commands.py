"""`crucible export | index | serve | client`: argument parsers (stdlib only, so `--help` stays instant) and dispatch."""

import argparse
import importlib
from typing import Any

COMMANDS = ("export", "index", "serve", "client")
MODULES = {"export": "export", "index": "indexer", "serve": "app", "client": "client"}  # command -> serve module


def add_parsers(sub: Any) -> None:
  """Add the serving subcommands to `sub` (an argparse subparsers action)."""
  p = sub.add_parser("export", help="export encoders, fusion and heads with jax.export (+ manifest.json)")
  p.add_argument("--workdir", required=True, help="trained run (newest checkpoint) or params directory")
  p.add_argument("--out", required=True, help="new or empty output directory")
  p.add_argument("--platforms", default="cpu", help="comma-separated jax.export platforms (cpu, cuda, tpu)")
  p = sub.add_parser("index", help="embed a collection into a searchable index (vectors + SQLite metadata)")
  p.add_argument("--workdir", help="trained run or params directory to export and embed with")
  p.add_argument("--export", help="a `crucible export` directory to embed with (instead of --workdir)")
  p.add_argument("--data", required=True, help="SOURCE to index: digit_world:SPLIT, manifest:FILE.jsonl|.csv or "
                 "shards:'DIR/*.tar' (own data, read with the model's preprocessing)")
  p.add_argument("--out", required=True, help="index directory (new, or existing with --append)")
  p.add_argument("--append", action="store_true", help="add the source's items to the existing index at --out")
  p.add_argument("--batch-size", type=int, default=64, help="items embedded per encoder call")
  p = sub.add_parser("serve", help="serve search over an index (HTTP API, web page, Prometheus metrics)")
  p.add_argument("--index", required=True, help="index directory from `crucible index`")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--token", help="bearer token required on every endpoint but /health (or $CRUCIBLE_SERVE_TOKEN)")
  p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB")
  p.add_argument("--deadline-ms", type=float, default=1000.0, help="default per-request encoding deadline")
  p.add_argument("--priorities", help="MODALITY=INT,... (higher first); default: a routed model's importance scores "
                 "of each query's parts, else text=3,image=2,audio=1,video=0")
  p.add_argument("--max-batch", type=int, default=16, help="queries per encoder batch")
  p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
  p.add_argument("--approximate", action="store_true", help="FAISS IVF search instead of exact")
  p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per approximate query")
  p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip compiling the encoders at start")
  p = sub.add_parser("client", help="edge query: encode locally with an export, send only the embedding")
  p.add_argument("--export", required=True, help="export directory (e.g. IDX/export of the served index)")
  p.add_argument("--url", default="http://127.0.0.1:8000", help="the `crucible serve` address")
  p.add_argument("--text", help="text query")
  p.add_argument("--file", help="image, audio or video file to query with")
  p.add_argument("--targets", nargs="*", help="target modalities (default: all)")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--token", help="bearer token of the server")
  p.add_argument("--json", help="also write the reply (with bytes sent and latencies) here")


def run(args: argparse.Namespace, config: Any) -> int:
  """Run the subcommand `args.command`; returns the exit status."""
  return importlib.import_module(f"crucible_jax.serve.{MODULES[args.command]}").run(args, config)
