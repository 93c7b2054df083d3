"""Two processes × 4 CPU devices run the whole pipeline like one process × 8, stop together and fail together.

Every job is started by `crucible_jax.parallel.launch.spawn` (each child joins with `jax.distributed` and runs the
`crucible` command line); references run in this process on conftest's 8 devices.

`full`: the whole `tiny,routed` run (three stages, four modalities, the router on, every evaluator, the held-out
speaker split) with 3 steps per stage, once, against the same run on one process.

`chain`: an image-only one-stage run (cheap to compile, so five launches stay affordable), in one workdir:
  sigterm     SIGTERM to process 1 only, early in training: both stop at one step, save, exit 0;
  launcher    resumed through `python -m crucible_jax.parallel.launch`; SIGTERM to the launcher two steps later:
              it forwards it to both, they stop at one step and save, and every process exits 0;
  save_death  resumed; process 1 dies right after starting a checkpoint save (CRUCIBLE_FAULT=1:save);
  eval_death  resumed; process 1 dies at the start of evaluation (CRUCIBLE_FAULT=1:eval);
  resumed     resumed cleanly from whatever the faults left: every step's loss and the results must match an
              uninterrupted run. `crucible eval` and `crucible generate` then run on the finished workdir.
No persistent compilation cache: a process that hits it runs ahead of one that compiles, and a skew over 30 s
fails gloo's context setup (measured here).
"""

import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from crucible_jax.config import load_experiment
from crucible_jax.parallel import launch
from crucible_jax.parallel.distributed import FAULT_ENV, FAULT_EXIT, any_process, fault_point
from crucible_jax.train.loop import Trainer

CONFIG = f"{pathlib.Path(__file__).parent.parent / 'experiments' / 'digit_world.py'}:tiny,routed"
STAGE_STEPS, HEARTBEAT_S, DEATH_BOUND_S, JOB_TIMEOUT_S = 3, 5, 60, 1200
OVERRIDES = [f"--config.stages.{s}.{k}={v}" for s in ("unimodal", "align", "joint")
             for k, v in (("steps", STAGE_STEPS), ("warmup", 1))]
OVERRIDES += ["--config.checkpoint.every=2", "--config.checkpoint.keep=20", "--config.log_every=1"]
CHAIN_STEPS, SIGTERM_AFTER = 16, 2
CHAIN = ["--config.model.modalities=('image',)", "--config.stages.unimodal.objective={'pretrain/image': 1.0}",
         "--config.evals={'pretrain': {'modalities': ('image',)}}", "--config.stage_order=('unimodal',)",
         f"--config.stages.unimodal.steps={CHAIN_STEPS}", "--config.stages.unimodal.warmup=2",
         "--config.checkpoint.every=2", "--config.checkpoint.keep=20", "--config.log_every=1",
         "--config.eval_splits=('test',)"]
NOT_METRICS = ("wall_s", "steps")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(root: pathlib.Path, name: str, argv: list[str], fault: str | None = None) -> list[subprocess.Popen]:
  """Both processes of a `crucible ARGV` job, each logging to ROOT/{name}{i}.log."""
  logs = [open(root / f"{name}{i}.log", "w") for i in range(2)]
  env = {FAULT_ENV: fault} if fault else {}
  try:
    return launch.spawn(argv, num_processes=2, port=_free_port(), cpu_devices=4, heartbeat_s=HEARTBEAT_S, logs=logs,
                        extra_env=env)
  finally:
    for log in logs:
      log.close()


def _launcher(root: pathlib.Path, name: str, argv: list[str]) -> subprocess.Popen:
  """The launcher process of a 2-process `crucible ARGV` job, the way users start one; both children log to it."""
  with open(root / f"{name}.log", "w") as log:
    return subprocess.Popen([sys.executable, "-m", "crucible_jax.parallel.launch", "--num-processes", "2",
                             "--cpu-devices", "4", "--port", str(_free_port()), "--heartbeat-timeout", str(HEARTBEAT_S),
                             "--", *argv], stdout=log, stderr=subprocess.STDOUT)


def _sigterm_after(procs: list[subprocess.Popen], target: subprocess.Popen, workdir: pathlib.Path, step: int,
                   log: pathlib.Path) -> None:
  """Send SIGTERM to `target` once metrics.jsonl has logged global step `step`."""
  deadline = time.monotonic() + JOB_TIMEOUT_S
  while not (workdir / "metrics.jsonl").exists() or max(_losses(workdir), default=0) < step:
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), log.read_text()[-3000:]
    time.sleep(0.05)
  target.send_signal(signal.SIGTERM)


def _train_argv(workdir: pathlib.Path, overrides: list[str] = CHAIN) -> list[str]:
  return ["train", "--config", CONFIG, "--workdir", str(workdir), *overrides]


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


def _single(config_overrides: list[str], workdir: pathlib.Path) -> tuple[dict[str, float], dict[int, float]]:
  """Results and per-step losses of the same run on one process of 8 devices."""
  trainer = Trainer(load_experiment(CONFIG, config_overrides), workdir)
  try:
    results = trainer.run()
  finally:
    trainer.close()
  return ({k: v for k, v in results.items() if k not in NOT_METRICS},
          {row["step"]: row["loss"] for row in trainer.sink.history})


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Loss per global step from metrics.jsonl (a resumed run's rows overwrite an interrupted run's)."""
  return {row["step"]: row["loss"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """The whole tiny pipeline on 2 processes × 4 devices, and on one process × 8."""
  root = tmp_path_factory.mktemp("full")
  rcs = _wait(_spawn(root, "two", _train_argv(root / "two", OVERRIDES)))
  return dict(root=root, rcs=rcs, logs=_logs(root, "two"), single=_single(OVERRIDES, root / "one"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """The jobs of the module docstring's chain, in order, in one workdir."""
  root = tmp_path_factory.mktemp("chain")
  workdir = root / "run"
  out = {"root": root, "workdir": workdir}
  procs = _spawn(root, "sigterm", _train_argv(workdir))
  try:
    _sigterm_after(procs, procs[1], workdir, SIGTERM_AFTER, root / "sigterm0.log")
  finally:
    out["sigterm_rcs"] = _wait(procs)
  out["sigterm_logs"] = _logs(root, "sigterm")
  out["sigterm_committed"] = _committed(workdir)
  launcher = _launcher(root, "launcher", _train_argv(workdir))
  try:
    _sigterm_after([launcher], launcher, workdir, max(_losses(workdir)) + SIGTERM_AFTER, root / "launcher.log")
  finally:
    out["launcher_rc"] = _wait([launcher])[0]
  out["launcher_log"] = (root / "launcher.log").read_text()
  out["launcher_committed"] = _committed(workdir)
  out["save_death"] = _faulted(root, workdir, "save_death", "save")
  out["eval_death"] = _faulted(root, workdir, "eval_death", "eval")
  out["resumed_rcs"] = _wait(_spawn(root, "resumed", _train_argv(workdir)))
  out["resumed_logs"] = _logs(root, "resumed")
  return out


def _results(workdir: pathlib.Path) -> dict[str, float]:
  results = json.loads((workdir / "results.json").read_text())
  return {k: v for k, v in results.items() if k not in NOT_METRICS}


def test_full_pipeline_on_two_processes_matches_one_process_on_eight_devices(full):
  assert full["rcs"] == [0, 0], full["logs"][0][-3000:]
  two, (one, single_losses) = _results(full["root"] / "two"), full["single"]
  assert sorted(two) == sorted(one)
  for split in ("test", "test_heldout_speaker"):
    for task in ("image_to_text/R@1", "audio_to_text/R@1", "video_to_text/R@1", "vqa/accuracy", "tagging/mAP",
                 "asr/wer", "fused/accuracy"):
      assert f"{split}/{task}" in two, sorted(two)
  assert {k: pytest.approx(v, abs=1e-3) for k, v in one.items()} == two
  losses = _losses(full["root"] / "two")
  assert sorted(losses) == list(range(1, 3 * STAGE_STEPS + 1))
  assert {s: pytest.approx(single_losses[s], rel=1e-4, abs=1e-6) for s in losses} == losses
  assert (full["root"] / "two" / "plots" / "retrieval_examples.png").exists()


def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(chain):
  assert chain["sigterm_rcs"] == [0, 0], chain["sigterm_logs"][0][-3000:]
  steps = [re.findall(r"SIGTERM: checkpoint saved at global step (\d+)", log) for log in chain["sigterm_logs"]]
  assert steps[0] == steps[1] and len(steps[0]) == 1, steps
  assert SIGTERM_AFTER <= int(steps[0][0]) < CHAIN_STEPS  # stopped mid-run: the faults below have saves to die in


def test_sigterm_to_the_launcher_stops_every_process_at_one_step_with_one_checkpoint(chain):
  log = chain["launcher_log"]
  assert chain["launcher_rc"] == 0, log[-3000:]
  steps = re.findall(r"SIGTERM: checkpoint saved at global step (\d+)", log)
  assert len(steps) == 2 and steps[0] == steps[1], steps  # one line per process, the same step
  stop, first_stop = int(steps[0]), chain["sigterm_committed"][-1]
  assert first_stop + SIGTERM_AFTER <= stop < CHAIN_STEPS - 2  # mid-run, with a save left for save_death to die in
  assert chain["launcher_committed"][-1] == stop  # the agreed step's checkpoint, written by both together
  assert "launch: job failed" not in log


@pytest.mark.parametrize("fault", ["save_death", "eval_death"])
def test_survivor_of_a_dead_peer_exits_nonzero_naming_it(chain, fault):
  run = chain[fault]
  assert run["rcs"][1] == FAULT_EXIT, run["logs"][1][-2000:]
  assert f"{FAULT_ENV}: process 1 exits at {fault.split('_')[0]!r}" in run["logs"][1]
  assert run["rcs"][0] != 0
  assert run["survivor_s"] < DEATH_BOUND_S
  assert re.search(r"stopped sending heartbeats\):\s*1\b", run["logs"][0]), run["logs"][0][-3000:]


def test_rerun_after_faults_resumes_to_the_uninterrupted_results(chain):
  assert chain["resumed_rcs"] == [0, 0], chain["resumed_logs"][0][-3000:]
  assert chain["save_death"]["committed"][-1] < CHAIN_STEPS  # the save in flight was never committed
  assert chain["eval_death"]["committed"][-1] == CHAIN_STEPS  # the eval death came after the final save
  one, single_losses = _single(CHAIN, chain["root"] / "single")
  losses = _losses(chain["workdir"])
  assert sorted(losses) == list(range(1, CHAIN_STEPS + 1))
  assert {s: pytest.approx(single_losses[s], rel=2e-5, abs=1e-6) for s in losses} == losses
  assert {k: pytest.approx(v, abs=1e-3) for k, v in one.items()} == _results(chain["workdir"])
  assert "test/pretrain/accuracy_image" in one


def test_eval_runs_across_processes_and_generate_refuses(chain):
  root, workdir = chain["root"], chain["workdir"]
  rcs = _wait(_spawn(root, "eval", ["eval", "--config", CONFIG, "--workdir", str(workdir), *CHAIN]))
  log = _logs(root, "eval")[0]
  assert rcs == [0, 0], log[-3000:]
  printed = json.loads(re.search(r"^\{$.*?^\}$", log, re.S | re.M).group())
  assert {k: pytest.approx(v, abs=1e-6) for k, v in _results(workdir).items()} == printed
  rcs = _wait(_spawn(root, "generate", ["generate", "--config", CONFIG, "--workdir", str(workdir),
                                        "--from", "text", "--to", "image", "--text", "3"]))
  assert rcs == [2, 2]
  assert "generate converts one input on one process; this job has 2 processes" in _logs(root, "generate")[0]


def test_fault_hook_rejects_a_malformed_spec_and_ignores_other_processes():
  with pytest.raises(ValueError, match="CRUCIBLE_FAULT='1:evil'"):
    fault_point("eval", env={FAULT_ENV: "1:evil"})
  fault_point("eval", env={FAULT_ENV: "1:eval"})  # this is process 0: still alive
  fault_point("save", env={FAULT_ENV: "0:eval"})  # another point: still alive


def test_stop_agreement_on_one_process_is_the_local_flag():
  assert any_process(True) and not any_process(False)
