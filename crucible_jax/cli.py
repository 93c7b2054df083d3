"""`crucible train | eval | config | bench | prepare | generate | tokenizer | convert | embed | zeroshot | retrieval
| export | index | serve | client | chaos`: the command line over experiment files."""

import argparse
import importlib
import json
import logging
import pathlib
import sys
import traceback

from crucible_jax import config_cli, tokenizer_cli
from crucible_jax.chaos import command as chaos_command  # stdlib only
from crucible_jax.serve import commands as serve_commands  # stdlib only

BENCH_KINDS = ("step", "data", "routing", "comm", "scaling", "search")
CONFIG_HELP = """\
--config FILE.py[:ARG]   an experiment file's get_config(ARG); ARG picks variants, e.g.
                         experiments/digit_world.py:tiny or experiments/own_data.py:tiny
--config.KEY=VALUE       override any existing field, dotted for nested ones; the value is parsed
--config.KEY VALUE       to the field's type (int, float, bool, str, tuple such as '(32, 32)').
                         e.g. --config.batch_size=64 --config.data.manifest=my/data.jsonl
                              --config.stages.align.steps 500
`crucible config --config FILE.py[:ARG] [--config.KEY=VALUE ...]` prints the resolved config.
A bad config stops with one line, `crucible: config error: ...` (exit 2), before anything is written."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="crucible", description=__doc__)
  parser.add_argument("--verbose", action="store_true", help="tracebacks and library logs on stderr")
  sub = parser.add_subparsers(dest="command", required=True)

  def with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]; --config.KEY=VALUE overrides fields")

  train = sub.add_parser("train", help="train all stages of an experiment (resumes from --workdir)",
                         epilog=CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  with_config(train)
  train.add_argument("--workdir", required=True)
  train.add_argument("--coordinator", help="HOST:PORT of process 0 for a multi-process run")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)
  train.add_argument("--allow-config-change", default="", metavar="KEY,...",
                     help="config keys (and their sub-keys) that may differ from the workdir's config.json")

  evaluate = sub.add_parser("eval", help="evaluate the latest checkpoint in --workdir", epilog=CONFIG_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
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
  config_cli.add_parser(sub, CONFIG_HELP)
  tokenizer_cli.add_parser(sub)
  from crucible_jax import convert, embed, retrieval_cli, zeroshot_cli  # numpy only
  for module in (convert, embed, zeroshot_cli, retrieval_cli):
    module.add_parser(sub)
  serve_commands.add_parsers(sub)
  chaos_command.add_parser(sub)

  prepare = sub.add_parser("prepare", help="build a dataset into the data directory")
  prepare.add_argument("dataset", choices=("digit_world",))
  prepare.add_argument("--data-dir", help="default: $CRUCIBLE_DATA_DIR, else ~/.cache/crucible_jax")
  prepare.add_argument("--config", help="experiment whose data config to prepare (default: digit_world defaults)")
  for command in sub.choices.values():  # `crucible train --verbose` as well as `crucible --verbose train`
    command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `crucible` console script; returns the exit status."""
  args, rest = _parser().parse_known_args(argv)
  overrides, unknown = config_overrides(rest)
  if unknown:
    print(f"crucible: error: unrecognised arguments: {' '.join(unknown)}", file=sys.stderr)
    return 2
  args.overrides = overrides  # commands that start `crucible` children pass them on (chaos)
  from crucible_jax.config import ConfigError, load_experiment  # deferred: keeps --help instant
  try:
    config = load_experiment(args.config, overrides) if getattr(args, "config", None) else None
  except ConfigError as e:
    return _config_error(e)
  command = {"train": _train, "eval": _eval, "bench": _bench, "prepare": _prepare, "generate": _generate,
             "config": config_cli.run, "tokenizer": tokenizer_cli.run, "convert": _lazy("convert"),
             "embed": _lazy("embed"), "zeroshot": _lazy("zeroshot_cli"), "retrieval": _lazy("retrieval_cli"),
             "chaos": chaos_command.run,
             **dict.fromkeys(serve_commands.COMMANDS, serve_commands.run)}[args.command]
  _route_library_logs(args.verbose)
  try:
    return command(args, config)
  except ConfigError as e:  # e.g. a workdir trained with another config
    return _config_error(e)
  except Exception as e:  # the cause in one line; the traceback in the run's log file or under --verbose
    return _report(e, args)


ERRORS_OF_INPUT = ("CheckpointError", "InputFileError", "InitFromError", "FileNotFoundError", "FloatingPointError",
                   "ValueError")
LOG_FILE = "crucible.log"  # in the workdir of a run that started: library logs and tracebacks


def _route_library_logs(verbose: bool) -> None:
  """Library logs (orbax and grain log through absl) stay off the terminal unless --verbose."""
  absl_logger = logging.getLogger("absl")
  for handler in absl_logger.handlers:  # a previous command's log file (several commands in one process)
    handler.close()
  absl_logger.handlers = [] if verbose else [logging.NullHandler()]
  absl_logger.propagate = verbose


def _log_to_workdir(workdir: pathlib.Path) -> None:
  handler = logging.FileHandler(workdir / LOG_FILE)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.getLogger("absl").addHandler(handler)


def _report(error: Exception, args: argparse.Namespace) -> int:
  """Print `crucible: error: <cause>` (one line) and put the traceback where --verbose or the log file shows it."""
  text = " ".join(str(error).split()) or type(error).__name__
  known = type(error).__name__ in ERRORS_OF_INPUT
  print(f"crucible: error: {text if known else f'{type(error).__name__}: {text}'}", file=sys.stderr)
  log = pathlib.Path(getattr(args, "workdir", "") or ".") / LOG_FILE
  if args.verbose:
    traceback.print_exception(error)
  elif args.command == "train" and log.is_file():
    with open(log, "a", encoding="utf-8") as f:
      traceback.print_exception(error, file=f)
    if not known:
      print(f"crucible: the traceback is in {log}", file=sys.stderr)
  elif not known:
    print("crucible: rerun with --verbose for the traceback", file=sys.stderr)
  return 1


def config_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
  """(`KEY=VALUE` overrides, unrecognised arguments) of the arguments argparse left: `--config.KEY=VALUE` or
  `--config.KEY VALUE`."""
  overrides, unknown = [], []
  items = iter(rest)
  for item in items:
    if not item.startswith("--config."):
      unknown.append(item)
    elif "=" in item:
      overrides.append(item)
    else:
      value = next(items, None)
      if value is None:
        unknown.append(f"{item} (no value)")
      else:
        overrides.append(f"{item}={value}")
  return overrides, unknown


def _config_error(error: Exception) -> int:
  print(f"crucible: config error: {error}", file=sys.stderr)
  return 2


def _lazy(name: str):
  """The `run(args, config)` of the subcommand module crucible_jax.<name>."""
  return lambda args, config: importlib.import_module(f"crucible_jax.{name}").run(args, config)


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
  import jax
  from crucible_jax.train.loop import Preempted, Trainer
  allowed = tuple(k.strip() for k in args.allow_config_change.split(",") if k.strip())
  try:  # another run's workdir (ConfigError), the mesh, param patterns, precision: refused before anything is written
    trainer = Trainer(config, args.workdir, allow_config_change=allowed)
  except ValueError as e:
    return _config_error(e)
  if not args.verbose and jax.process_index() == 0:
    _log_to_workdir(trainer.workdir)
  try:
    trainer.run()
  except Preempted as e:
    print(f"crucible: {e}", file=sys.stderr)
    return 0
  finally:
    trainer.close()
  return 0


def _eval(args, config) -> int:
  from crucible_jax import inference
  from crucible_jax.data.verify import check_splits
  from crucible_jax.parallel.mesh import build_mesh
  from crucible_jax.train.evaluate import evaluate_splits
  splits = tuple(args.split or config.get("eval_splits", ("test",)))
  check_splits(config.data, splits)
  try:  # params only (no optimizer state, train iterator or metric files); creates nothing; none: FileNotFoundError
    model = inference.load(args.workdir, config=config, mesh=build_mesh(dict(config.mesh)))
  except ValueError as e:  # as in _train (mesh, param patterns), or the params do not fit this config
    return _config_error(e)
  results = evaluate_splits(model.experiment, model.params, splits, args.workdir)
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
  from crucible_jax.data.digit_world.config import default_data_config
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
