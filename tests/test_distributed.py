"""Two processes × 4 CPU devices train like one process × 8, checkpoint and resume together, and fail together.

The job is started by `crucible_jax.parallel.launch.spawn` (each child joins with `jax.distributed` and runs the
`crucible train` command line); the reference runs in this process on conftest's 8 devices. One run does it
all: once both processes have committed the step-4 checkpoint, process 1 is SIGKILLed; process 0 must exit
non-zero on its own, naming the dead peer, within the heartbeat bound. A second launch resumes from the latest
checkpoint and finishes; every step's loss must match the single-process run.
"""

import json
import pathlib
import signal
import socket
import subprocess
import time

import pytest

from crucible_jax.config import load_experiment
from crucible_jax.parallel import launch
from crucible_jax.train.loop import Trainer

DIGIT_WORLD = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")
STEPS, KILL_AFTER, HEARTBEAT_S, DEATH_BOUND_S = 12, 4, 5, 60
OVERRIDES = ["--config.model.modalities=('image',)", "--config.stages.unimodal.objective={'pretrain/image': 1.0}",
             "--config.evals={}", "--config.stage_order=('unimodal',)", f"--config.stages.unimodal.steps={STEPS}",
             "--config.stages.unimodal.warmup=2", "--config.checkpoint.every=2", "--config.checkpoint.keep=10",
             "--config.checkpoint.async_save=false", "--config.log_every=1", "--config.eval_splits=()"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(workdir: pathlib.Path, log_prefix: str) -> list[subprocess.Popen]:
  """Both processes of a `crucible train` job, each logging to ROOT/{log_prefix}{i}.log."""
  argv = ["train", "--config", f"{DIGIT_WORLD}:tiny", "--workdir", str(workdir), *OVERRIDES]
  logs = [open(workdir.parent / f"{log_prefix}{i}.log", "w") for i in range(2)]
  try:
    return launch.spawn(argv, num_processes=2, port=_free_port(), cpu_devices=4, heartbeat_s=HEARTBEAT_S, logs=logs,
                        extra_env={"JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache")})
  finally:
    for log in logs:
      log.close()


def _committed(workdir: pathlib.Path, step: int) -> bool:
  return (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Loss per global step from metrics.jsonl (a resumed run's rows overwrite the killed run's)."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
  """Kill process 1 after the step-4 checkpoint, watch process 0, then resume both to the end."""
  root = tmp_path_factory.mktemp("dist")
  workdir = root / "run"
  workdir.mkdir()
  procs = _spawn(workdir, "killed")
  try:
    deadline = time.monotonic() + 400
    while not _committed(workdir, KILL_AFTER) and time.monotonic() < deadline:
      assert all(p.poll() is None for p in procs), (root / "killed0.log").read_text()[-3000:]
      time.sleep(0.05)
    assert _committed(workdir, KILL_AFTER), "the two processes never committed a checkpoint together"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor_rc = procs[0].wait(timeout=DEATH_BOUND_S + 30)
    survivor_s = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  survivor_log = (root / "killed0.log").read_text()
  resumed = _spawn(workdir, "resumed")
  rcs = [p.wait(timeout=400) for p in resumed]
  return dict(root=root, workdir=workdir, survivor_rc=survivor_rc, survivor_s=survivor_s,
              survivor_log=survivor_log, resumed_rcs=rcs, resumed_log=(root / "resumed0.log").read_text())


def test_survivor_of_a_killed_peer_exits_nonzero_with_a_clear_message(two_process):
  assert two_process["survivor_rc"] != 0
  assert two_process["survivor_s"] < DEATH_BOUND_S
  assert "another task died" in two_process["survivor_log"], two_process["survivor_log"][-2000:]


def test_resumed_job_matches_one_process_on_eight_devices(two_process):
  assert two_process["resumed_rcs"] == [0, 0], two_process["resumed_log"][-3000:]
  assert "resumed stage 'unimodal'" in two_process["resumed_log"]
  losses = _losses(two_process["workdir"])
  assert sorted(losses) == list(range(1, STEPS + 1))
  config = load_experiment(f"{DIGIT_WORLD}:tiny", OVERRIDES)
  trainer = Trainer(config, two_process["root"] / "single")
  try:
    trainer.run()
  finally:
    trainer.close()
  single = {row["step"]: row["loss"] for row in trainer.sink.history}
  for step in range(1, STEPS + 1):
    assert losses[step] == pytest.approx(single[step], rel=2e-5, abs=1e-6), step
