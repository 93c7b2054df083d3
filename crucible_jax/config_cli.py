"""`crucible config --config F.py[:ARG] [--config.KEY=VALUE ...]`: print the resolved, validated config and exit."""

import argparse
from typing import Any

import ml_collections


def add_parser(sub: Any, epilog: str) -> None:
  """The `config` subcommand's arguments."""
  p = sub.add_parser("config", help="print the resolved, validated config of an experiment and exit",
                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
  """Print `config` (JSON, every field) on stdout."""
  del args
  print(config.to_json_best_effort(indent=2, sort_keys=True))
  return 0
