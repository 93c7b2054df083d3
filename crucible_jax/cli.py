"""`crucible train | eval | bench | prepare | generate`: the command line over experiment files."""

import argparse
import importlib
import json
import pathlib
import sys

from crucible_jax.serve import commands as serve_commands  # stdlib only

BENCH_KINDS = ("step", "data", "routing", "comm", "scaling", "search")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="crucible", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  def with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")

  train = sub.add_parser("train", help="train all stages of an experiment (resumes from --workdir)")
  with_config(train)
  train.add_argument("--workdir", required=True)
  train.add_argument("--coordinator", help="HOST:PORT of process 0 for a multi-process run")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)

  evaluate = sub.add_parser("eval", help="evaluate the latest checkpoint in --workdir")
  with_config(evaluate)
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--split", action="append", help="split(s) to evaluate (default: config.eval_splits)")

  bench = sub.add_parser("bench", help="run a benchmark and write one JSON object")
  bench.add_argument("kind", choices=BENCH_KINDS)
  bench.add_argument("--config", help="experiments/NAME.py[:ARG] (every kind but search)")
  bench.add_argument("--workdir", help="trained run to benchmark (search)")
  bench.add_argument("--json", required=True, help="output JSON path")

  from crucible_jax.generate import add_parser as add_generate_parser  # numpy only: keeps --help instant
  add_generate_parser(sub)
  serve_commands.add_parsers(sub)

  prepare = sub.add_parser("prepare", help="build a dataset into the data directory")
  prepare.add_argument("dataset", choices=("digit_world",))
  prepare.add_argument("--data-dir", help="default: $CRUCIBLE_DATA_DIR, else ~/.cache/crucible_jax")
  prepare.add_argument("--config", help="experiment whose data config to prepare (default: digit_world defaults)")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `crucible` console script; returns the exit status."""
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    print(f"crucible: error: unrecognised arguments: {' '.join(unknown)}", file=sys.stderr)
    return 2
  from crucible_jax.config import ConfigError, load_experiment  # deferred: keeps --help instant
  try:
    config = load_experiment(args.config, overrides) if getattr(args, "config", None) else None
  except ConfigError as e:
    print(f"crucible: config error: {e}", file=sys.stderr)
    return 2
  command = {"train": _train, "eval": _eval, "bench": _bench, "prepare": _prepare, "generate": _generate,
             **dict.fromkeys(serve_commands.COMMANDS, serve_commands.run)}[args.command]
  return command(args, config)


def _train(args, config) -> int:
  from crucible_jax.parallel.distributed import apply_xla_flags, initialize_distributed, overlap_xla_flags
  xla = config.get("xla", None)
  if xla is not None and xla.get("overlap_comm", False):  # before the backend starts, or it is ignored
    apply_xla_flags(overlap_xla_flags(True))
  try:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  except ValueError as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 2
  from crucible_jax.train.loop import Preempted, Trainer
  trainer = Trainer(config, args.workdir)
  try:
    trainer.run()
  except FileNotFoundError as e:  # a benchmark's data directory (or a file in it) is missing
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  except Preempted as e:
    print(f"crucible: {e}", file=sys.stderr)
    return 0
  except FloatingPointError as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  finally:
    trainer.close()
  return 0


def _eval(args, config) -> int:
  from crucible_jax.train.loop import Trainer
  trainer = Trainer(config, args.workdir)
  try:
    params = trainer.restore_final_params()
    results = trainer.evaluate(params, splits=tuple(args.split or config.get("eval_splits", ("test",))))
  except FileNotFoundError as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  finally:
    trainer.close()
  print(json.dumps(results, indent=2, sort_keys=True))
  return 0


def _bench(args, config) -> int:
  if (args.kind == "search") != (args.workdir is not None) or (args.kind != "search") != (config is not None):
    print(f"crucible: error: bench {args.kind} takes {'--workdir' if args.kind == 'search' else '--config'} only",
          file=sys.stderr)
    return 2
  module = importlib.import_module(f"crucible_jax.bench.{args.kind}")
  report = module.run_workdir(args.workdir) if args.kind == "search" else module.run(config)
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2, sort_keys=True))
  print(json.dumps(report, indent=2, sort_keys=True))
  return 0


def _generate(args, config) -> int:
  from crucible_jax.generate import run
  return run(args, config)


def _prepare(args, config) -> int:
  import time
  from crucible_jax.data.digit_world import prepare_digit_world
  from crucible_jax.data.pipeline import default_data_config
  data_cfg = config.data if config is not None else default_data_config()
  if args.data_dir:
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.data_dir = args.data_dir
  start = time.perf_counter()
  builder = prepare_digit_world(data_cfg)
  print(f"prepared digit_world in {time.perf_counter() - start:.1f}s at {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
