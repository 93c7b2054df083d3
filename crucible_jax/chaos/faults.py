"""The campaign's faults: each runs real `crucible train` children against a finished reference run and returns one
`Trial` per injected fault (survived: the run recovered as specified; lost: results or a checkpoint not intact)."""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
from typing import Callable

import ml_collections
import numpy as np

from crucible_jax.chaos.runs import Outcome, Runner, comparable, differing, results_of
from crucible_jax.train.checkpoint import CHECKPOINTS_DIR
from crucible_jax.train.integrity import MANIFEST, verify
from crucible_jax.train.stages import plan_stages


@dataclasses.dataclass
class Trial:
  fault: str
  name: str
  survived: bool
  lost: bool
  detail: str


@dataclasses.dataclass
class Context:
  """What every fault needs: the runner, the finished reference run and the run's step schedule."""
  runner: Runner
  config: ml_collections.ConfigDict
  reference_dir: pathlib.Path
  reference: dict[str, float]
  rng: np.random.Generator

  @property
  def total(self) -> int:
    return plan_stages(self.config)[-1].end

  @property
  def saves(self) -> list[int]:
    """Global steps at which the run saves: every checkpoint.every steps and at each stage's end."""
    every = int(self.config.checkpoint.every)
    periodic = set(range(every, self.total + 1, every)) if every > 0 else set()
    return sorted(periodic | {plan.end for plan in plan_stages(self.config)})

  def root(self, name: str) -> pathlib.Path:
    return self.runner.root / name


def _verified(workdir: pathlib.Path) -> list[int]:
  directory = workdir / CHECKPOINTS_DIR
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()),
                reverse=True) if directory.is_dir() else []


def _tail(outcome: Outcome) -> str:
  lines = [line for line in outcome.log.splitlines() if line.startswith("crucible:")]
  return lines[-1] if lines else f"exit {outcome.rc}"


DAMAGES = ("truncate", "flip")


def damage_file(path: pathlib.Path, damage: str) -> None:
  """`truncate`: cut `path` to half its size; `flip`: invert one byte in its middle (same size)."""
  size = path.stat().st_size
  if damage == "truncate":
    os.truncate(path, size // 2)
    return
  with open(path, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)[0]
    f.seek(size // 2)
    f.write(bytes([byte ^ 0xFF]))


def _finishes_identically(ctx: Context, name: str, workdir: pathlib.Path, *extra: str) -> tuple[bool, bool, str]:
  """Rerun `workdir` to the end: (exit 0, results differ from the reference, what differs)."""
  (workdir / "results.json").unlink(missing_ok=True)
  outcome = ctx.runner.train(name, workdir, *extra)
  bad = differing(comparable(workdir), ctx.reference)
  return outcome.rc == 0, bool(bad), (f"rerun exit {outcome.rc}; " + (f"differs in {bad[:4]}" if bad else
                                                                       "results and logged losses identical"))


# --- kill -9 -------------------------------------------------------------------------------------------------


def kill_points(ctx: Context, n: int) -> list[tuple[str, int]]:
  """`n` (point, global step) pairs, ascending: the first save (killed while writing), then at each stage boundary
  the ending stage's save and the next stage's first step, then random steps and saves."""
  plans = plan_stages(ctx.config)
  fixed = [("save", ctx.saves[0])]
  for ending, starting in zip(plans, plans[1:]):
    fixed += [("save", ending.end), ("step", starting.start + 1)]
  chosen = dict.fromkeys(fixed[:n])
  candidates = [("step", s) for s in range(1, ctx.total)] + [("save", s) for s in ctx.saves]
  taken = {s for _, s in chosen}
  for index in ctx.rng.permutation(len(candidates)):
    if len(chosen) >= n:
      break
    point, step = candidates[index]
    if step not in taken:
      chosen[(point, step)], taken = None, taken | {step}
  return sorted(chosen, key=lambda p: p[1])


_RESUMED = re.compile(r"resumed stage '\w+' at step \d+ \(global (\d+)\)|stage '\w+' finished at global step (\d+)")


def _resumed_from(log: str) -> int:
  """The global step a run resumed from (its last finished stage's end when it restarted on a stage boundary);
  0 for a fresh start."""
  found = [int(a or b) for a, b in _RESUMED.findall(log)]
  return max(found, default=0)


def kill9(ctx: Context, n: int | None, points: list[tuple[str, int]] | None = None) -> list[Trial]:
  """SIGKILL at `n` points (default: `kill_points`) of one run (each run resumes the last), then a final resume:
  results identical."""
  workdir = ctx.root("kill9")
  points, trials, logs = points or kill_points(ctx, n or 5), [], []
  for i, (point, step) in enumerate(points):
    outcome = ctx.runner.train(f"kill9_{i}", workdir, freeze_at=f"{point}@{step}")
    in_flight = point == "save" and not (workdir / CHECKPOINTS_DIR / str(step) / MANIFEST).is_file()
    trials.append(Trial("kill9", f"{point}@{step}", outcome.killed, False,
                        f"killed: {outcome.killed}; save of step {step} uncommitted: {in_flight}"
                        if point == "save" else f"killed: {outcome.killed}"))
    logs.append(outcome.log)
    if not outcome.killed:
      trials[-1].detail += f"; {_tail(outcome)}"
  ok, lost, detail = _finishes_identically(ctx, "kill9_final", workdir)
  logs.append((ctx.runner.root / "logs" / "kill9_final.log").read_text())
  for trial, next_log in zip(trials, logs[1:]):
    trial.survived, trial.lost = trial.survived and ok, lost
    trial.detail += f"; the next run resumed from global step {_resumed_from(next_log)}"
  trials[-1].detail += f"; final {detail}"
  return trials


# --- a damaged newest checkpoint -----------------------------------------------------------------------------


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


def _damage_newest(workdir: pathlib.Path, damage: str) -> tuple[pathlib.Path, int, int]:
  """Damage the largest file of the newest verified step: (that file, the step, the previous verified step)."""
  newest, previous = _verified(workdir)[:2]
  victim = _largest_file(workdir / CHECKPOINTS_DIR / str(newest))
  damage_file(victim, damage)
  return victim, newest, previous


def _warned(log: str, workdir: pathlib.Path, victim: pathlib.Path, newest: int, previous: int) -> bool:
  """A warning in `log` names the damaged file of step `newest` and the fallback step `previous`."""
  named = str(victim.relative_to(workdir / CHECKPOINTS_DIR / str(newest)))
  return any("warning: damaged checkpoint" in line and named in line and f"using step {previous}" in line
             for line in log.splitlines())


def corrupt_ckpt(ctx: Context, n: int | None, damages: tuple[str, ...] = DAMAGES) -> list[Trial]:
  """The finished reference run's newest checkpoint truncated / a byte flipped, then a rerun: it falls back to the
  previous checkpoint with a warning naming the file, and finishes with identical results."""
  trials = []
  for damage in damages[:n or len(damages)]:
    workdir = pathlib.Path(shutil.copytree(ctx.reference_dir, ctx.root(f"corrupt_{damage}")))
    victim, newest, previous = _damage_newest(workdir, damage)
    ok, lost, detail = _finishes_identically(ctx, f"corrupt_{damage}", workdir)
    warned = _warned((ctx.runner.root / "logs" / f"corrupt_{damage}.log").read_text(), workdir, victim, newest,
                     previous)
    trials.append(Trial("corrupt_ckpt", f"{damage} step {newest}", ok and warned, lost,
                        f"warning names {victim.name} and step {previous}: {warned}; {detail}"))
  return trials


# --- disk full during a save ---------------------------------------------------------------------------------


def enospc(ctx: Context, n: int | None) -> list[Trial]:
  """ENOSPC in the commit of the second save: a clear error, the first checkpoint intact, a rerun resumes."""
  trials = []
  for at in ctx.saves[1:1 + (n or 1)]:
    workdir = ctx.root(f"enospc_{at}")
    clear, intact, said = _disk_full_named(ctx.runner.train(f"enospc_{at}", workdir, inject=f"enospc@{at}"),
                                           workdir, at)
    ok, lost, detail = _finishes_identically(ctx, f"enospc_{at}_rerun", workdir)
    trials.append(Trial("enospc", f"save of step {at}", clear and ok, lost or not intact, f"{said}; {detail}"))
  return trials


def _disk_full_named(outcome: Outcome, workdir: pathlib.Path, at: int) -> tuple[bool, bool, str]:
  """(a clear error naming the failed save of step `at` and the kept step, the kept step intact, what was seen)."""
  message, kept = _tail(outcome), _verified(workdir)
  clear = (outcome.rc == 1 and "no space left on device" in message and f"checkpoint step {at}" in message
           and bool(kept) and f"step {kept[0]}, is untouched" in message)
  intact = bool(kept) and verify(workdir / CHECKPOINTS_DIR / str(kept[0])) is None
  return clear, intact, f"{message!r}; previous checkpoint {kept[:1]} intact: {intact}"


# --- a damaged input shard -----------------------------------------------------------------------------------


def bad_shard(ctx: Context, n: int | None, damages: tuple[str, ...] = DAMAGES) -> list[Trial]:
  """A train ArrayRecord shard truncated / a byte flipped in a copy of the data: the run stops before its first
  step naming the file, and writes no checkpoint."""
  from crucible_jax.data.digit_world import builder  # tensorflow-datasets: only when this fault runs
  if ctx.config.data.name != "digit_world":
    return [Trial("bad_shard", "not applicable", False, False, f"data {ctx.config.data.name!r}: the campaign damages "
                  "DigitWorld shards; own-data files are tests/test_own_data.py's")]
  root = pathlib.Path(builder.data_dir_of(ctx.config.data))
  dataset = pathlib.Path(builder.prepare_digit_world(ctx.config.data).data_dir)
  trials = []
  for damage in damages[:n or len(damages)]:
    copy = pathlib.Path(shutil.copytree(dataset, ctx.root(f"data_{damage}") / dataset.relative_to(root)))
    data_root = ctx.root(f"data_{damage}")
    victim = sorted(copy.glob("*-train.array_record-*"))[0]
    damage_file(victim, damage)
    workdir = ctx.root(f"bad_shard_{damage}")
    outcome = ctx.runner.train(f"bad_shard_{damage}", workdir, f"--config.data.data_dir={data_root}")
    message = _tail(outcome)
    named = outcome.rc == 1 and f"input file {victim}" in message and "Traceback" not in outcome.log
    written = _verified(workdir)
    trials.append(Trial("bad_shard", f"{damage} {victim.name}", named and not written, bool(written),
                        f"{message!r}; checkpoints written: {written}"))
  return trials


# --- NaN / inf -----------------------------------------------------------------------------------------------


def _skipped(workdir: pathlib.Path) -> int:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return int(max((row.get("skipped", 0) for row in rows), default=0))


def nan(ctx: Context, n: int | None) -> list[Trial]:
  """NaN in an input batch / inf in a gradient, under nan_policy skip (counted, the run finishes finite) and abort
  (stops naming the step; the last checkpoint predates it; a rerun finishes with identical results)."""
  at = ctx.saves[0] + min(3, ctx.saves[1] - ctx.saves[0] - 1) if len(ctx.saves) > 1 else ctx.saves[0]
  cases = [("nan_batch", "skip"), ("inf_grad", "abort"), ("nan_batch", "abort"), ("inf_grad", "skip")][:n or 4]
  trials = []
  for kind, policy in cases:
    name = f"{kind}_{policy}"
    workdir, policy_arg = ctx.root(name), f"--config.nan_policy={policy}"
    outcome = ctx.runner.train(name, workdir, policy_arg, inject=f"{kind}@{at}", seed=int(ctx.config.seed))
    injected = "injected" in outcome.log or kind == "inf_grad"
    if policy == "skip":
      results = results_of(workdir) or {}
      skipped = _skipped(workdir)
      finite = bool(results) and all(math.isfinite(v) for v in results.values())
      trials.append(Trial("nan", f"{kind}@{at} {policy}", outcome.rc == 0 and skipped == 1 and injected and finite,
                          outcome.rc != 0, f"exit {outcome.rc}; skipped steps logged: {skipped}; results finite: "
                          f"{finite} (every checkpoint passed the finite check on save)"))
    else:
      clear, before, said = _aborted_before(outcome, workdir, at)
      ok, lost, detail = _finishes_identically(ctx, f"{name}_rerun", workdir, policy_arg)
      trials.append(Trial("nan", f"{kind}@{at} {policy}", clear and before and ok, lost or not before,
                          f"{said}; {detail}"))
  return trials


def _aborted_before(outcome: Outcome, workdir: pathlib.Path, at: int) -> tuple[bool, bool, str]:
  """(a clear nan_policy='abort' error naming step `at`, the newest checkpoint intact and older, what was seen)."""
  message, kept = _tail(outcome), _verified(workdir)
  clear = outcome.rc == 1 and "nan_policy='abort'" in message and f"(global {at})" in message
  before = bool(kept) and kept[0] < at and verify(workdir / CHECKPOINTS_DIR / str(kept[0])) is None
  return clear, before, f"{message!r}; newest checkpoint {kept[:1]} predates step {at}: {before}"


# --- compressed gradients ------------------------------------------------------------------------------------


def compressed(ctx: Context, n: int | None, methods: tuple[str, ...] = ("int8", "powersgd")) -> list[Trial]:
  """Per compression method: an uninterrupted run, and one killed during its second save (so it resumes from the
  first, mid-stage, with the error-feedback state restored): identical results and logged losses."""
  trials = []
  at = ctx.saves[1] if len(ctx.saves) > 1 else ctx.saves[0]
  for method in methods[:n or len(methods)]:
    method_arg = f"--config.compression.method={method}"
    straight, workdir = ctx.root(f"compressed_{method}_straight"), ctx.root(f"compressed_{method}")
    ctx.runner.train(f"compressed_{method}_straight", straight, method_arg)
    reference = comparable(straight)
    killed = ctx.runner.train(f"compressed_{method}_killed", workdir, method_arg, freeze_at=f"save@{at}")
    rerun = ctx.runner.train(f"compressed_{method}_rerun", workdir, method_arg)
    resumed = _resumed_from(rerun.log)
    bad = differing(comparable(workdir), reference) if reference else ["<the uninterrupted run failed>"]
    trials.append(Trial("compressed", f"{method} killed at save@{at}", killed.killed and rerun.rc == 0 and resumed > 0,
                        bool(bad), f"the rerun resumed from global step {resumed}; "
                        + (f"differs in {bad[:4]}" if bad else "results and logged losses identical")))
  return trials


# --- several faults in one workdir (the test suite's form: a third of the runs) --------------------------------


def combined(ctx: Context, damage: str = "truncate") -> list[Trial]:
  """One workdir (nan_policy abort) through kill -9 in the first save, an inf gradient after it, ENOSPC in the
  second save, kill -9 in the third save and its newest checkpoint damaged, each run resuming the last: every
  fault's own checks, and the final run must finish identically (else every trial counts as lost)."""
  workdir, policy = ctx.root("combined"), "--config.nan_policy=abort"
  first, second, third = ctx.saves[:3]
  kill_first = ctx.runner.train("combined_kill_first", workdir, policy, freeze_at=f"save@{first}")
  first_in_flight = not (workdir / CHECKPOINTS_DIR / str(first) / MANIFEST).is_file()
  inf = ctx.runner.train("combined_inf", workdir, policy, inject=f"inf_grad@{first + 1}", seed=int(ctx.config.seed))
  aborted = _aborted_before(inf, workdir, first + 1)
  full = _disk_full_named(ctx.runner.train("combined_enospc", workdir, policy, inject=f"enospc@{second}"), workdir,
                          second)
  kill_third = ctx.runner.train("combined_kill_third", workdir, policy, freeze_at=f"save@{third}")
  third_in_flight = not (workdir / CHECKPOINTS_DIR / str(third) / MANIFEST).is_file()
  victim, newest, previous = _damage_newest(workdir, damage)
  ok, lost, detail = _finishes_identically(ctx, "combined_final", workdir, policy)
  final_log = (ctx.runner.root / "logs" / "combined_final.log").read_text()
  trials = [Trial("kill9", f"save@{first}", kill_first.killed, False,
                  f"killed: {kill_first.killed}; save of step {first} uncommitted: {first_in_flight}; the next run "
                  f"resumed from global step {_resumed_from(inf.log)}"),
            Trial("kill9", f"save@{third}", kill_third.killed, False,
                  f"killed: {kill_third.killed}; save of step {third} uncommitted: {third_in_flight}; the next run "
                  f"resumed from global step {_resumed_from(final_log)}")]
  trials.append(Trial("nan", f"inf_grad@{first + 1} abort", aborted[0] and aborted[1], not aborted[1], aborted[2]))
  trials.append(Trial("enospc", f"save of step {second}", full[0], not full[1], full[2]))
  for trial in trials:
    trial.survived, trial.lost = trial.survived and ok, trial.lost or lost
  warned = _warned(final_log, workdir, victim, newest, previous)
  trials.append(Trial("corrupt_ckpt", f"{damage} step {newest}", ok and warned, lost,
                      f"warning names {victim.name} and step {previous}: {warned}; {detail}"))
  return trials


FAULTS: dict[str, Callable[[Context, int | None], list[Trial]]] = {
    "kill9": kill9, "corrupt_ckpt": corrupt_ckpt, "enospc": enospc, "bad_shard": bad_shard, "nan": nan,
    "compressed": compressed}
