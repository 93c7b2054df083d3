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

from crucible_jax import tasks
from crucible_jax.common_types import MODALITIES
from crucible_jax.data import loader, registry
from crucible_jax.data.tokenizers import tokenizer_of
from crucible_jax.data.verify import check_splits
from crucible_jax.eval import plots
from crucible_jax.parallel.distributed import any_process, fault_point
from crucible_jax.train import curriculum, init_from, stages as stages_lib
from crucible_jax.train.checkpoint import Checkpointer
from crucible_jax.train.evaluate import evaluate_splits, global_host_view
from crucible_jax.train.hooks import HookEntry, MetricSink, Progress, StepInfo, scalars_of
from crucible_jax.train.programs import StagePrograms
from crucible_jax.train.setup import Experiment
from crucible_jax.train.workdir import check_config, record_config


class Preempted(Exception):
  """Raised after SIGTERM once a checkpoint is safely written."""


class Trainer:
  """Runs the stages of a validated config on its mesh, writing everything under `workdir`.

  A workdir that holds a run of another config is refused before anything is written, unless every changed key
  is covered by `allow_config_change`. `read_only` (eval, generate) creates nothing and needs a checkpoint.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               mesh: jax.sharding.Mesh | None = None, *, read_only: bool = False,
               allow_config_change: tuple[str, ...] = ()):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self._config_changes = {} if read_only else check_config(self.workdir, config, tuple(allow_config_change))
    self.experiment = Experiment(config, mesh)  # config errors (mesh, param patterns) before the workdir exists
    self.mesh = self.experiment.mesh
    self.plans = self.experiment.plans
    self.total_steps = self.plans[-1].end
    self.hooks: list[HookEntry] = []
    self.checkpointer = Checkpointer(self.workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.get("async_save", True), read_only=read_only)
    if not read_only:
      self.workdir.mkdir(parents=True, exist_ok=True)
    self.sink = None if read_only else MetricSink(self.workdir)
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
    """Train every stage (resuming from the workdir when it holds a checkpoint), evaluate, write results.

    Before the first step: every split the run reads is verified and the checkpoint to resume from is chosen;
    only then is `config.json` written.
    """
    start_time = time.perf_counter()
    splits = tuple(self.config.get("eval_splits", ("test",)))
    check_splits(self.config.data, ("train", *splits))
    resume = self.checkpointer.resume_point()
    if jax.process_index() == 0:  # the resolved config beside its results: a run can be read and re-run later
      record_config(self.workdir, self.config, self._config_changes)
    previous = signal.signal(signal.SIGTERM, self._request_stop)
    try:
      params = self._train_all_stages(resume)
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.checkpointer.wait()
    results = self.evaluate(params, splits=splits)
    results.update(registry.record_stats(self.config.data))  # bad records skipped, captions cut
    results.update(wall_s=time.perf_counter() - start_time, steps=self.total_steps)
    self._write_results(results)
    if self.config.get("plots", True):
      self._write_plots(params, results)
    return results

  def _request_stop(self, signum, frame) -> None:
    self._stop_requested = True

  def _train_all_stages(self, resume: tuple[int, dict] | None) -> Any:
    iterator = registry.make_train_iterator(self.config.data, global_batch=self.config.batch_size,
                                            seed=self.config.seed, sample_hook=curriculum.sample_hook(self.config),
                                            process_index=jax.process_index(), process_count=jax.process_count())
    self._current_iterator = iterator
    latest, meta = resume if resume is not None else (None, None)
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
        batch = loader.to_global_batch(next(iterator), self.experiment.batch_sharding)
        state, metrics = train_step(state, batch, jax.random.fold_in(self._base_rng, global_step))
        stage_step += 1
        info = StepInfo(plan.name, stage_step, plan.steps, global_step + 1, state, metrics)
        fault_point("step", info.global_step)
        self._check_finite(info)
        for hook in self.hooks:
          if (global_step + 1) % hook.every == 0:
            hook.fn(info)
        self.checkpointer.poll()  # a failed background save stops the run here, not one interval later
        if any_process(self._stop_requested):  # every process stops at this same step
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
    fault_point("save", info.global_step)

  def _checkpoint_hook(self, info: StepInfo) -> None:
    self._save(info, self._current_iterator)

  def _log_hook(self, info: StepInfo) -> None:
    scalars = scalars_of(info.metrics)
    scalars["skipped"] = float(info.state.skipped)
    if self.sink is not None:
      self.sink.write(info.global_step, info.stage, scalars)
    self._progress(info, scalars)

  def restore_final_params(self) -> Any:
    """Params of the latest checkpoint in the workdir (for `crucible eval`)."""
    resume = self.checkpointer.resume_point()
    if resume is None:
      raise FileNotFoundError(f"no checkpoint in {self.checkpointer.directory}: train first")
    latest, meta = resume
    plan = self.plans[meta["stage_index"]]
    abstract, _, _ = self.experiment.state_layout(self.experiment.stage_parts(plan)[0], self.experiment.trained(plan))
    iterator = registry.make_train_iterator(self.config.data, global_batch=self.config.batch_size,
                                            seed=self.config.seed, process_index=jax.process_index(),
                                            process_count=jax.process_count())
    return self.checkpointer.restore(latest, abstract, iterator).params

  # --- evaluation ----------------------------------------------------------------------------------

  def evaluate(self, params: Any, splits: tuple[str, ...]) -> dict[str, float]:
    """Every configured evaluator on each split; keys `split/task/metric`."""
    return evaluate_splits(self.experiment, params, splits, self.workdir)

  def _write_results(self, results: dict[str, float]) -> None:
    if jax.process_index() != 0:
      return
    (self.workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    width = max(len(k) for k in results)
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(results.items())))

  def _write_plots(self, params: Any, results: dict[str, float]) -> None:
    """Loss curves, retrieval examples on the first test batch, VQA accuracy per question type → plots/.

    Every process runs the embedding step (it is one sharded computation); process 0 draws.
    """
    pairs = [tuple(p) for p in self.config.evals.get("retrieval", {}).get("pairs", ())][:4]
    splits = tuple(self.config.get("eval_splits", ("test",)))
    if pairs and splits:
      local = next(iter(registry.make_eval_batches(self.config.data, splits[0],
                                                   batch_size=self.config.eval_batch_size)))
      with jax.set_mesh(self.mesh):
        device_batch = loader.to_global_batch(local, self.experiment.batch_sharding)
        outputs, batch = global_host_view(self.experiment.eval_step(("embed",))(params, device_batch), device_batch,
                                          MODALITIES)
    if jax.process_index() != 0:
      return
    out = self.workdir / "plots"
    out.mkdir(exist_ok=True)
    history = [json.loads(line) for line in (self.workdir / "metrics.jsonl").read_text().splitlines()]
    if history:
      plots.loss_curves(history, out / "loss_curves.png")
    if pairs and splits:
      plots.retrieval_examples(batch, outputs["embeddings"], pairs, out / "retrieval_examples.png",
                               tokenizer=tokenizer_of(self.config.data))
    question_types = tasks.source_extras(self.config.data.name).question_types
    if "vqa" in self.config.evals and question_types:
      plots.vqa_by_type(results, question_types, out / "vqa_by_type.png")

  def close(self) -> None:
    try:
      self.checkpointer.close()
    finally:
      if self.sink is not None:
        self.sink.close()
