"""The full tiny pipeline on two processes × 4 CPU devices: same results as one process × 8, stopping together.

Every job is started by `crucible_jax.parallel.launch.spawn` (each child joins with `jax.distributed` and runs the
`crucible` command line); the reference runs in this process on conftest's 8 devices. The config is the whole
`tiny,routed` run (three stages, four modalities, the router on, every evaluator, the held-out speaker split) with
3 steps per stage. One module fixture runs, in order:

  uninterrupted  a clean job → results.json, the reference of everything below;
  sigterm        SIGTERM to process 1 only, after the step-2 checkpoint: both stop at one step, save, exit 0;
  save_death     resumed with process 1 dying right after starting a checkpoint save (CRUCIBLE_FAULT=1:save);
  eval_death     resumed with process 1 dying at the start of evaluation (CRUCIBLE_FAULT=1:eval);
  resumed        resumed cleanly from whatever the faults left: must finish with the uninterrupted results.
"""

import json
import pathlib
import re
import signal
import socket
import subprocess
import time

import pytest

from crucible_jax.config import load_experiment
from crucible_jax.parallel import launch
from crucible_jax.parallel.distributed import FAULT_ENV
from crucible_jax.train.loop import Trainer

CONFIG = f"{pathlib.Path(__file__).parent.parent / 'experiments' / 'digit_world.py'}:tiny,routed"
STAGE_STEPS, SIGTERM_AFTER, HEARTBEAT_S, DEATH_BOUND_S, JOB_TIMEOUT_S = 3, 2, 5, 60, 900
OVERRIDES = [f"--config.stages.{s}.{k}={v}" for s in ("unimodal", "align", "joint")
             for k, v in (("steps", STAGE_STEPS), ("warmup", 1))]
OVERRIDES += ["--config.checkpoint.every=2", "--config.checkpoint.keep=20", "--config.log_every=1"]
TOTAL = 3 * STAGE_STEPS
NOT_METRICS = ("wall_s", "steps")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(root: pathlib.Path, name: str, argv: list[str], fault: str | None = None) -> list[subprocess.Popen]:
  """Both processes of a `crucible ARGV` job, each logging to ROOT/{name}{i}.log."""
  logs = [open(root / f"{name}{i}.log", "w") for i in range(2)]
  env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), **({FAULT_ENV: fault} if fault else {})}
  try:
    return launch.spawn(argv, num_processes=2, port=_free_port(), cpu_devices=4, heartbeat_s=HEARTBEAT_S, logs=logs,
                        extra_env=env)
  finally:
    for log in logs:
      log.close()


def _train_argv(workdir: pathlib.Path) -> list[str]:
  return ["train", "--config", CONFIG, "--workdir", str(workdir), *OVERRIDES]


def _wait(procs: list[subprocess.Popen]) -> list[int]:
  try:
    return [p.wait(timeout=JOB_TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _logs(root: pathlib.Path, name: str) -> list[str]:
  return [(root / f"{name}{i}.log").read_text() for i in range(2)]


def _committed(workdir: pathlib.Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and (d / "commit_success.txt").exists())


def _faulted(root: pathlib.Path, workdir: pathlib.Path, name: str, fault: str) -> dict:
  """Run a resumed job in which process 1 dies at `fault`; time how long process 0 outlives it."""
  procs = _spawn(root, name, _train_argv(workdir), fault=f"1:{fault}")
  try:
    rc1 = procs[1].wait(timeout=JOB_TIMEOUT_S)
    died_at = time.monotonic()
    rc0 = procs[0].wait(timeout=DEATH_BOUND_S + 60)
    return dict(rcs=[rc0, rc1], survivor_s=time.monotonic() - died_at, logs=_logs(root, name),
                committed=_committed(workdir))
  finally:
    _wait(procs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every job of the module docstring, in order, plus the single-process reference."""
  root = tmp_path_factory.mktemp("dist")
  out = {"root": root}
  clean = root / "clean"
  out["uninterrupted_rcs"] = _wait(_spawn(root, "uninterrupted", _train_argv(clean)))
  out["uninterrupted_logs"] = _logs(root, "uninterrupted")
  out["clean"] = clean

  faulty = root / "faulty"
  procs = _spawn(root, "sigterm", _train_argv(faulty))
  try:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (faulty / "checkpoints" / str(SIGTERM_AFTER) / "commit_success.txt").exists():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _logs(root, "sigterm")[0][-3000:]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    out["sigterm_rcs"] = _wait(procs)
  out["sigterm_logs"] = _logs(root, "sigterm")
  out["save_death"] = _faulted(root, faulty, "save_death", "save")
  out["eval_death"] = _faulted(root, faulty, "eval_death", "eval")
  out["resumed_rcs"] = _wait(_spawn(root, "resumed", _train_argv(faulty)))
  out["resumed_logs"] = _logs(root, "resumed")
  out["faulty"] = faulty
  return out


def _results(workdir: pathlib.Path) -> dict[str, float]:
  results = json.loads((workdir / "results.json").read_text())
  return {k: v for k, v in results.items() if k not in NOT_METRICS}


def test_full_pipeline_on_two_processes_matches_one_process_on_eight_devices(runs):
  assert runs["uninterrupted_rcs"] == [0, 0], runs["uninterrupted_logs"][0][-3000:]
  two = _results(runs["clean"])
  trainer = Trainer(load_experiment(CONFIG, OVERRIDES), runs["root"] / "single")
  try:
    one = {k: v for k, v in trainer.run().items() if k not in NOT_METRICS}
  finally:
    trainer.close()
  assert sorted(two) == sorted(one)
  for split in ("test", "test_heldout_speaker"):
    for task in ("image_to_text/R@1", "vqa/accuracy", "tagging/mAP", "asr/wer", "fused/accuracy"):
      assert f"{split}/{task}" in two, sorted(two)
  assert {k: pytest.approx(v, abs=1e-3) for k, v in one.items()} == two
  rows = [json.loads(line) for line in (runs["clean"] / "metrics.jsonl").read_text().splitlines()]
  losses = {row["step"]: row["loss"] for row in rows}
  assert sorted(losses) == list(range(1, TOTAL + 1))
  single = {row["step"]: row["loss"] for row in trainer.sink.history}
  assert {s: pytest.approx(single[s], rel=1e-4, abs=1e-6) for s in losses} == losses
  assert (runs["clean"] / "plots" / "retrieval_examples.png").exists()


def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(runs):
  assert runs["sigterm_rcs"] == [0, 0], runs["sigterm_logs"][0][-3000:]
  steps = [re.findall(r"SIGTERM: checkpoint saved at global step (\d+)", log) for log in runs["sigterm_logs"]]
  assert steps[0] == steps[1] and len(steps[0]) == 1, steps
  assert SIGTERM_AFTER < int(steps[0][0]) < TOTAL  # stopped mid-run, so the faults below have saves to die in


@pytest.mark.parametrize("fault", ["save_death", "eval_death"])
def test_survivor_of_a_dead_peer_exits_nonzero_naming_it(runs, fault):
  run = runs[fault]
  assert run["rcs"][1] == 13, run["logs"][1][-2000:]  # FAULT_EXIT: the hook fired
  assert f"{FAULT_ENV}: process 1 exits at {fault.split('_')[0]!r}" in run["logs"][1]
  assert run["rcs"][0] != 0
  assert run["survivor_s"] < DEATH_BOUND_S
  assert re.search(r"stopped sending heartbeats\):\s*1\b", run["logs"][0]), run["logs"][0][-3000:]


def test_rerun_after_faults_resumes_to_the_uninterrupted_results(runs):
  assert runs["resumed_rcs"] == [0, 0], runs["resumed_logs"][0][-3000:]
  assert runs["eval_death"]["committed"][-1] == TOTAL  # the eval death came after the final save
  assert runs["save_death"]["committed"][-1] < TOTAL  # the save death left the previous checkpoint the newest
  assert {k: pytest.approx(v, abs=1e-5) for k, v in _results(runs["clean"]).items()} == _results(runs["faulty"])


def test_eval_runs_across_processes_and_generate_refuses(runs):
  root = runs["root"]
  rcs = _wait(_spawn(root, "eval", ["eval", "--config", CONFIG, "--workdir", str(runs["clean"]), *OVERRIDES]))
  log = _logs(root, "eval")[0]
  assert rcs == [0, 0], log[-3000:]
  printed = json.loads(re.search(r"^\{$.*?^\}$", log, re.S | re.M).group())
  assert {k: pytest.approx(v, abs=1e-6) for k, v in _results(runs["clean"]).items()} == printed
  rcs = _wait(_spawn(root, "generate", ["generate", "--config", CONFIG, "--workdir", str(runs["clean"]),
                                        "--from", "text", "--to", "image", "--text", "3"]))
  assert rcs == [2, 2]
  assert "generate converts one input on one process; this job has 2 processes" in _logs(root, "generate")[0]
