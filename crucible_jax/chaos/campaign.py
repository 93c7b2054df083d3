"""The campaign: an uninterrupted reference run, then each fault's trials against it; a table and one JSON object."""

import dataclasses
import pathlib
import time

import ml_collections
import numpy as np

from crucible_jax.chaos.faults import FAULTS, Context, Trial
from crucible_jax.chaos.runs import Runner, comparable

COLUMNS = ("fault", "trials", "survived", "data lost")


def run_campaign(config_spec: str, overrides: list[str], config: ml_collections.ConfigDict, root: pathlib.Path,
                 faults: tuple[str, ...], trials: int | None, seed: int, env: dict[str, str]) -> dict:
  """Run the reference and every fault in `faults` under `root`; the campaign's report (see `crucible chaos`)."""
  start = time.perf_counter()
  runner = Runner(config_spec, list(overrides), root, env)
  reference_dir = root / "reference"
  outcome = runner.train("reference", reference_dir)
  reference = comparable(reference_dir)
  if outcome.rc != 0 or reference is None:
    raise RuntimeError(f"the uninterrupted reference run failed (exit {outcome.rc}); see {root / 'logs'}")
  ctx = Context(runner, config, reference_dir, reference, np.random.default_rng(seed))
  report = {"config": config_spec, "overrides": list(overrides), "seed": seed, "reference": reference, "faults": {}}
  for fault in faults:
    done: list[Trial] = FAULTS[fault](ctx, trials)
    report["faults"][fault] = {"trials": len(done), "survived": sum(t.survived for t in done),
                               "data_lost": sum(t.lost for t in done),
                               "details": [dataclasses.asdict(t) for t in done]}
  report["wall_s"] = time.perf_counter() - start
  return report


def table(report: dict) -> str:
  """The report as a Markdown table: fault, trials, survived, data lost."""
  rows = [[name, str(f["trials"]), str(f["survived"]), str(f["data_lost"])] for name, f in report["faults"].items()]
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
