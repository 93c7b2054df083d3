"""Modality imbalance on DigitWorld: clean images, speech at 0..10 dB SNR; the fused task with and without OGM-GE.

Config: `--config experiments/digit_world_imbalance.py[:VARIANTS]`, VARIANTS a comma list of ogm_ge (gradient
balancing on), audio_alone (the weak modality trained by itself: what it can learn in these steps) and tiny (the
seconds-long test run). Image + audio, one `joint` stage on the fused digit-string task from scratch, which is where
the easy modality starves the harder one: the noisy speech is learnable alone, more slowly than the clean image.

Runner (trains the three arms, then a linear probe on the frozen pooled audio features measures the weak modality):
  python experiments/digit_world_imbalance.py --workdir /tmp/imbalance [--steps 400] [--probe-batches 16] \
      [--config.model.balance.alpha=0.3 ...]
"""

import argparse
import json
import pathlib
import sys
import time

import ml_collections

from crucible_jax.config import load_experiment_module
from crucible_jax.train.curriculum import default_curriculum_config

HERE = pathlib.Path(__file__).resolve()
VARIANTS = ("ogm_ge", "audio_alone", "tiny")
ARMS = ("audio_alone", "none", "ogm_ge")  # runner arms: variant names, "none" = the plain joint run


def _digit_world() -> ml_collections.ConfigDict:
  """experiments/digit_world.py:imbalanced (loaded by path: experiments/ is not a package)."""
  return load_experiment_module(HERE.parent / "digit_world.py").get_config("imbalanced")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The imbalanced fused-task run; see the module docstring for variants."""
  variants = tuple(v for v in (arg or "").split(",") if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown digit_world_imbalance variant(s) {unknown}; known: {VARIANTS}")
  c = _digit_world()
  c.data.update(train_size=6000, val_size=256, test_size=1000, heldout_size=64)  # samples per split
  c.data.speech_snr_db = (0.0, 10.0)  # the weak modality: learnable alone, slower than the clean image
  c.model.modalities = ("audio",) if "audio_alone" in variants else ("image", "audio")  # strong, weak modality
  for family in ("image", "audio"):
    c.model[family].update(width=48, depth=1, heads=4, mlp=96)  # encoder width/depth/heads/MLP width
  c.model.joint_dim = 48  # shared embedding size
  c.model.balance.update(method="ogm_ge" if "ogm_ge" in variants else "none",  # gradient balancing before fusion
                         alpha=0.8, ge_scale=1.0)  # OGM strength; GE noise std in units of the gradient's std
  c.batch_size = 64  # global batch, examples per step
  c.eval_batch_size = 200  # examples per eval step
  c.optim.schedules = {}  # per-group LR schedule overrides: group -> dict(warmup, decay, end_fraction, delay)
  c.optim.skip_below = {}  # per-group gradient-norm threshold below which the group's update is skipped
  c.curriculum = default_curriculum_config()
  c.stage_order = ("joint",)
  c.stages = dict(joint=dict(steps=400, lr=2e-3, warmup=40, frozen=(), carry=(),  # steps, peak LR, warmup steps
                             objective={"fused": 1.0}))
  c.evals = dict(fused={})
  c.eval_splits = ("test",)  # splits evaluated at the end → results.json
  c.log_every = 50  # steps between metric rows
  c.checkpoint = dict(every=0, keep=1, async_save=False)  # only the final checkpoint
  c.plots = False  # no plots: the runner prints the comparison
  if "tiny" in variants:
    c.data.update(train_size=256, val_size=64, test_size=64, heldout_size=64)
    for family in ("image", "audio"):
      c.model[family].update(width=16, depth=1, heads=2, mlp=32)
    c.model.joint_dim = 16
    c.batch_size, c.eval_batch_size = 16, 32
    c.stages.joint.update(steps=4, warmup=1)
    c.log_every = 2
  return c


def _probe(trainer, params, probe_batches: int) -> dict[str, float]:
  """Linear probe of frozen pooled audio features: fit on train-split samples, score on the test split."""
  from crucible_jax.data import registry
  from crucible_jax.eval import probe

  cfg, model = trainer.config, trainer.experiment.model
  batch = cfg.eval_batch_size
  train = probe.extract_features(model, params, registry.make_eval_batches(cfg.data, "train", batch_size=batch),
                                 "audio", max_batches=probe_batches)
  test = probe.extract_features(model, params, registry.make_eval_batches(cfg.data, "test", batch_size=batch),
                                "audio")
  return probe.linear_probe(train, test)


def main(argv: list[str] | None = None) -> dict:
  """Train the arms, probe the audio encoder of each (and of the shared initialisation), print and save."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="one subdirectory per arm is written here")
  parser.add_argument("--steps", type=int, default=400, help="train steps per arm")
  parser.add_argument("--probe-batches", type=int, default=16, help="train-split batches the probe is fit on")
  parser.add_argument("--tiny", action="store_true", help="the seconds-long smoke run")
  args, overrides = parser.parse_known_args(argv)  # the rest: --config.x=v, applied to every arm
  import jax
  from crucible_jax.config import load_experiment
  from crucible_jax.train.loop import Trainer

  workdir, summary = pathlib.Path(args.workdir), {}
  for arm in ARMS:
    spec = f"{HERE}:{','.join(a for a in (arm if arm != 'none' else '', 'tiny' if args.tiny else '') if a)}"
    steps = 4 if args.tiny else args.steps
    config = load_experiment(spec, [f"--config.stages.joint.steps={steps}",
                                    f"--config.stages.joint.warmup={max(1, steps // 10)}", *overrides])
    trainer = Trainer(config, workdir / arm)
    try:
      start = time.perf_counter()
      results = trainer.run()
      train_s = time.perf_counter() - start
      if arm == "none":  # the same seed initialises both joint arms: the untrained encoder is the floor
        init = trainer.experiment.init_params(jax.random.fold_in(jax.random.key(config.seed), 1000))
        summary["init"] = {f"probe/audio/{k}": v for k, v in _probe(trainer, init, args.probe_batches).items()}
      scores = _probe(trainer, trainer.restore_final_params(), args.probe_batches)
    finally:
      trainer.close()
    summary[arm] = {"test/fused/accuracy": results.get("test/fused/accuracy"), "train_wall_s": train_s,
                    "steps": steps, **{f"probe/audio/{k}": v for k, v in scores.items()}}
  (workdir / "probe.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
  print(json.dumps(summary, indent=2, sort_keys=True))
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
