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
  p.add_argument("--data", required=True, help="SOURCE to index, e.g. digit_world:test")
  p.add_argument("--out", required=True, help="index directory (new, or existing with --append)")
  p.add_argument("--append", action="store_true", help="add the source's items to the existing index at --out")
  p.add_argument("--batch-size", type=int, default=64, help="items embedded per encoder call")


def run(args: argparse.Namespace, config: Any) -> int:
  """Run the subcommand `args.command`; returns the exit status."""
  return importlib.import_module(f"crucible_jax.serve.{MODULES[args.command]}").run(args, config)
