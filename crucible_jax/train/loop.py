"""The one trainer: all stages, checkpoints, metrics, progress, evaluation, preemption.

Extended by hooks (`add_hook(fn, every=n)`), never forked. The only module that touches files, clocks and signals.
"""

import json
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from crucible_jax.data import pipeline as data_lib
from crucible_jax.eval import plots
from crucible_jax.eval.evaluators import build_evaluators
from crucible_jax.train import curriculum, init_from, stages as stages_lib
from crucible_jax.train.checkpoint import Checkpointer
from crucible_jax.train.evaluate import evaluate_split
from crucible_jax.train.hooks import HookEntry, MetricSink, Progress, StepInfo, scalars_of
from crucible_jax.train.programs import StagePrograms
from crucible_jax.train.setup import Experiment


class Preempted(Exception):
  """Raised after SIGTERM once a checkpoint is safely written."""


class Trainer:
  """Runs the stages of a validated config on its mesh, writing everything under `workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.experiment = Experiment(config, mesh)
    self.mesh = self.experiment.mesh
    self.plans = self.experiment.plans
    self.total_steps = self.plans[-1].end
    self.hooks: list[HookEntry] = []
    self.sink = MetricSink(self.workdir)
    self.checkpointer = Checkpointer(self.workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.get("async_save", True))
    self._stop_requested = False
    self._base_rng = jax.random.key(config.seed)
    self._progress = Progress(self.total_steps)
    self.add_hook(self._log_hook, every=config.log_every)
    self.add_hook(self._checkpoint_hook, every=config.checkpoint.every)

  def add_hook(self, fn, every: int) -> None:
    """Call `fn(StepInfo)` after every `every`-th global step (0 disables)."""
    if every > 0:
      self.hooks.append(HookEntry(fn, every))

  # --- running -------------------------------------------------------------------------------------

  def run(self) -> dict[str, float]:
    """Train every stage (resuming from the workdir when it holds a checkpoint), evaluate, write results."""
    start_time = time.perf_counter()
    if jax.process_index() == 0:  # the resolved config beside its results: a run can be read and re-run later
      (self.workdir / "config.json").write_text(self.config.to_json_best_effort(indent=2, sort_keys=True))
    previous = signal.signal(signal.SIGTERM, self._request_stop)
    try:
      params = self._train_all_stages()
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.checkpointer.wait()
    results = self.evaluate(params, splits=tuple(self.config.get("eval_splits", ("test",))))
    results.update(wall_s=time.perf_counter() - start_time, steps=self.total_steps)
    self._write_results(results)
    if self.config.get("plots", True) and jax.process_index() == 0:
      self._write_plots(params, results)
    return results

  def _request_stop(self, signum, frame) -> None:
    self._stop_requested = True

  def _train_all_stages(self) -> Any:
    iterator = data_lib.make_train_iterator(self.config.data, global_batch=self.config.batch_size,
                                            seed=self.config.seed, sample_hook=curriculum.sample_hook(self.config),
                                            process_index=jax.process_index(), process_count=jax.process_count())
    self._current_iterator = iterator
    latest = self.checkpointer.latest_step()
    meta = self.checkpointer.restore_meta(latest) if latest is not None else None
    first = meta["stage_index"] if meta else 0
    params = None
    programs = StagePrograms(self.experiment, self.plans[first:], self._base_rng)
    try:
      for plan in self.plans[first:]:
        resume = meta if (meta and meta["stage_index"] == plan.index) else None
        params = self._train_stage(plan, params, iterator, resume, latest, programs)
    finally:
      programs.close()
    return params

  def _train_stage(self, plan, previous_params, iterator, resume: dict | None, latest: int | None,
                   programs: StagePrograms) -> Any:
    if resume is not None and resume["stage_step"] >= plan.steps:  # finished: its params move on (model may grow)
      abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                     self.experiment.abstract_params, self.experiment.param_shardings)
      print(f"stage {plan.name!r} finished at global step {plan.end}: its params carry on", file=sys.stderr)
      return self.checkpointer.restore_params(latest, abstract_params, iterator)
    abstract, make, shardings, train_step = programs.get(plan)
    if resume is not None:
      state = self.checkpointer.restore(latest, abstract, iterator)
      print(f"resumed stage {plan.name!r} at step {int(state.step)} (global {latest})", file=sys.stderr)
    else:
      fresh = self.experiment.init_params(jax.random.fold_in(self._base_rng, 1000 + plan.index))
      if previous_params is None and self.config.get("init_from"):  # the run's first step: start from a source
        fresh = init_from.apply(self.config, fresh, self.experiment.param_shardings, self.workdir)
      params = fresh if previous_params is None else stages_lib.handoff(previous_params, fresh, tuple(plan.cfg.carry))
      state = self.experiment.new_state(make, shardings, params)
    stage_step = int(state.step)
    with jax.set_mesh(self.mesh):
      while stage_step < plan.steps:
        global_step = plan.start + stage_step
        batch = data_lib.to_global_batch(next(iterator), self.experiment.batch_sharding)
        state, metrics = train_step(state, batch, jax.random.fold_in(self._base_rng, global_step))
        stage_step += 1
        info = StepInfo(plan.name, stage_step, plan.steps, global_step + 1, state, metrics)
        self._check_finite(info)
        for hook in self.hooks:
          if (global_step + 1) % hook.every == 0:
            hook.fn(info)
        if self._stop_requested:
          self._save(info, iterator)
          self.checkpointer.wait()
          raise Preempted(f"SIGTERM: checkpoint saved at global step {global_step + 1}; rerun to resume")
    self._save(StepInfo(plan.name, stage_step, plan.steps, plan.end, state, {}), iterator)
    return state.params

  def _check_finite(self, info: StepInfo) -> None:
    if self.config.nan_policy == "abort" and not bool(info.metrics["finite"]):
      raise FloatingPointError(f"non-finite loss or gradient in stage {info.stage!r} at step {info.stage_step} "
                               f"(global {info.global_step}); nan_policy='abort'. The update was not applied.")

  def _save(self, info: StepInfo, iterator) -> None:
    plan = next(p for p in self.plans if p.name == info.stage)
    meta = {"stage": info.stage, "stage_index": plan.index, "stage_step": info.stage_step,
            "global_step": info.global_step}
    self.checkpointer.save(info.global_step, info.state, iterator, meta)

  def _checkpoint_hook(self, info: StepInfo) -> None:
    self._save(info, self._current_iterator)

  def _log_hook(self, info: StepInfo) -> None:
    scalars = scalars_of(info.metrics)
    scalars["skipped"] = float(info.state.skipped)
    self.sink.write(info.global_step, info.stage, scalars)
    self._progress(info, scalars)

  def restore_final_params(self) -> Any:
    """Params of the latest checkpoint in the workdir (for `crucible eval`)."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {self.checkpointer.directory}: train first")
    meta = self.checkpointer.restore_meta(latest)
    tx, *_ = self.experiment.stage_parts(self.plans[meta["stage_index"]])
    abstract, _, _ = self.experiment.state_layout(tx)
    iterator = data_lib.make_train_iterator(self.config.data, global_batch=self.config.batch_size,
                                            seed=self.config.seed, process_index=jax.process_index(),
                                            process_count=jax.process_count())
    return self.checkpointer.restore(latest, abstract, iterator).params

  # --- evaluation ----------------------------------------------------------------------------------

  def evaluate(self, params: Any, splits: tuple[str, ...]) -> dict[str, float]:
    """Every configured evaluator on each split; keys `split/task/metric`."""
    evaluators = build_evaluators(self.config.evals)
    heads = tuple(sorted({h for e in evaluators.values() for h in e.heads}))
    eval_step = self.experiment.eval_step(heads)
    eval_batch = self.config.get("eval_batch_size", self.config.batch_size)
    to_device = lambda b: data_lib.to_global_batch(b, self.experiment.batch_sharding)
    results = {}
    with jax.set_mesh(self.mesh):
      for split in splits:
        evaluators = build_evaluators(self.config.evals)
        for evaluator in evaluators.values():  # evaluators that need files or data (image_generation's recogniser)
          if hasattr(evaluator, "attach"):
            evaluator.attach(workdir=self.workdir, data=self.config.data, split=split)
        batches = data_lib.make_eval_batches(self.config.data, split, batch_size=eval_batch)
        scores = evaluate_split(eval_step, params, batches, evaluators, to_device)
        results.update({f"{split}/{k}": v for k, v in scores.items()})
    return results

  def _write_results(self, results: dict[str, float]) -> None:
    if jax.process_index() != 0:
      return
    (self.workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    width = max(len(k) for k in results)
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(results.items())))

  def _write_plots(self, params: Any, results: dict[str, float]) -> None:
    """Loss curves, retrieval examples on the first test batch, VQA accuracy per question type → plots/."""
    out = self.workdir / "plots"
    out.mkdir(exist_ok=True)
    history = [json.loads(line) for line in (self.workdir / "metrics.jsonl").read_text().splitlines()]
    if history:
      plots.loss_curves(history, out / "loss_curves.png")
    pairs = [tuple(p) for p in self.config.evals.get("retrieval", {}).get("pairs", ())][:4]
    splits = tuple(self.config.get("eval_splits", ("test",)))
    if pairs and splits:
      split = splits[0]
      batch = next(iter(data_lib.make_eval_batches(self.config.data, split, batch_size=self.config.eval_batch_size)))
      with jax.set_mesh(self.mesh):
        outputs = self.experiment.eval_step(("embed",))(params, data_lib.to_global_batch(batch, self.experiment.batch_sharding))
      embeddings = {m: np.asarray(v) for m, v in outputs["embeddings"].items()}
      plots.retrieval_examples(batch, embeddings, pairs, out / "retrieval_examples.png")
    if "vqa" in self.config.evals:
      from crucible_jax.data.digit_world import QUESTION_TYPES
      plots.vqa_by_type(results, QUESTION_TYPES, out / "vqa_by_type.png")

  def close(self) -> None:
    self.checkpointer.close()
    self.sink.close()
