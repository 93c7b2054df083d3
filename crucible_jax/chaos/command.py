"""`crucible chaos`: the fault-injection campaign's command line (heavy imports wait for `run`)."""

import argparse
import json
import pathlib
import sys
from typing import Any

FAULT_NAMES = ("kill9", "corrupt_ckpt", "enospc", "bad_shard", "nan", "compressed")


def add_parser(sub: Any) -> None:
  """The `chaos` subcommand's arguments."""
  p = sub.add_parser("chaos", help="fault-injection campaign: real train runs killed, damaged, starved, poisoned",
                     description="Runs `crucible train` children of --config: an uninterrupted reference, then each "
                     "fault's trials, and compares every final results.json (all keys but wall_s) with the "
                     "reference's. Prints a table (fault, trials, survived, data lost); writes --json.")
  p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]; --config.KEY=VALUE go to every run")
  p.add_argument("--workdir", required=True, help="empty or new directory for the campaign's runs and logs")
  p.add_argument("--faults", default=",".join(FAULT_NAMES), help=f"comma list of {', '.join(FAULT_NAMES)}")
  p.add_argument("--trials", type=int, help="trials per fault (default: kill9 5, nan 4, corrupt_ckpt, bad_shard and "
                 "compressed 2, enospc 1; the fixed variants cap the count)")
  p.add_argument("--seed", type=int, default=0, help="picks kill9's random kill points")
  p.add_argument("--cpu-devices", type=int, help="run the children on this many simulated CPU devices")
  p.add_argument("--json", required=True, help="output JSON path")


def _error(message: str) -> int:
  print(f"crucible: config error: {message}", file=sys.stderr)
  return 2


def run(args: argparse.Namespace, config: Any) -> int:
  """Check the arguments, run the campaign, print its table and write its JSON."""
  faults = tuple(f for f in args.faults.split(",") if f)
  unknown = sorted(set(faults) - set(FAULT_NAMES))
  if unknown or not faults:
    return _error(f"--faults {args.faults!r}: unknown {unknown}; choose from {', '.join(FAULT_NAMES)}")
  if args.trials is not None and args.trials < 1:
    return _error(f"--trials must be ≥ 1, got {args.trials}")
  root = pathlib.Path(args.workdir)
  if root.exists() and any(root.iterdir()):
    return _error(f"--workdir {root} is not empty: the campaign needs a fresh directory")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 2:
    return _error("the campaign needs checkpoint.every ≥ 1 and checkpoint.keep ≥ 2 (a previous checkpoint to fall "
                  f"back to); got every={config.checkpoint.every}, keep={config.checkpoint.keep}")
  env = {}
  if args.cpu_devices:
    env = {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(args.cpu_devices)}
  from crucible_jax.chaos.campaign import run_campaign, table
  root.mkdir(parents=True, exist_ok=True)
  report = run_campaign(args.config, args.overrides, config, root, faults, args.trials, args.seed, env)
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2, sort_keys=True))
  print(table(report))
  return 0 if all(f["survived"] == f["trials"] and not f["data_lost"] for f in report["faults"].values()) else 1
