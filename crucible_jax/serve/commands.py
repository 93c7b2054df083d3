"""`crucible export | index | serve | client`: argument parsers (stdlib only, so `--help` stays instant) and dispatch."""

import argparse
import importlib
from typing import Any

COMMANDS = ("export", "index", "serve", "client")


def add_parsers(sub: Any) -> None:
  """Add the serving subcommands to `sub` (an argparse subparsers action)."""
  p = sub.add_parser("export", help="export encoders, fusion and heads with jax.export (+ manifest.json)")
  p.add_argument("--workdir", required=True, help="trained run (newest checkpoint) or params directory")
  p.add_argument("--out", required=True, help="new or empty output directory")
  p.add_argument("--platforms", default="cpu", help="comma-separated jax.export platforms (cpu, cuda, tpu)")


def run(args: argparse.Namespace, config: Any) -> int:
  """Run the subcommand `args.command`; returns the exit status."""
  return importlib.import_module(f"crucible_jax.serve.{args.command}").run(args, config)
