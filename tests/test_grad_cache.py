"""GradCache: chunked contrastive gradients equal the full-batch step's on the 8-device mesh."""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from crucible_jax import load_experiment
from crucible_jax.cli import main
from crucible_jax.config import ConfigError
from crucible_jax.bench import grad_cache as grad_cache_bench
from crucible_jax.train import grad_cache, stages as stages_lib, step as step_lib
from crucible_jax.train.setup import Experiment
from serve_fixtures import ROOT, TINY

OVERRIDES = ["--config.model.modalities=('image', 'text')", "--config.batch_size=32", "--config.stage_order=('align',)",
             "--config.evals={'retrieval': {'pairs': (('image', 'text'),)}}",
             "--config.stages.align.objective={'contrastive/image-text': 1.0, 'pretrain/image': 0.5}"]


def _random_batch(experiment: Experiment, size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  batch = experiment.example_batch(size)
  batch["image"] = rng.random(batch["image"].shape, np.float32)
  batch["text"] = rng.integers(1, 200, batch["text"].shape, np.int32)
  batch["digits"][:, 0] = rng.integers(0, 10, size)
  batch["num_digits"][:] = 1
  batch["string_id"] = np.arange(size, dtype=np.int32) % 24  # some rows share content: several positives
  batch["weight"][:] = rng.uniform(0.5, 1.5, size)
  batch["image_present"][:] = batch["text_present"][:] = True
  batch["text_present"][3] = False  # a row with no caption: masked out of the contrastive term
  return batch


@pytest.fixture(scope="module")
def stage():
  """(experiment, params, align-stage forward and objective, loss_fn, batch on the mesh, rng)."""
  config = load_experiment(f"{ROOT / TINY}", OVERRIDES)
  experiment = Experiment(config)
  plan = next(p for p in stages_lib.plan_stages(config) if p.name == "align")
  _, frozen, heads, objective = experiment.stage_parts(plan)
  forward = step_lib.make_forward_fn(experiment.model, heads, frozen, experiment.rules)
  params = experiment.init_params(jax.random.key(0))
  batch = {k: jax.device_put(v, experiment.batch_sharding) for k, v in _random_batch(experiment, 32).items()}
  return experiment, params, forward, objective, batch, jax.random.key(1)


def _rel(a, b) -> float:
  diff = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (diff / sum(float(np.sum(np.asarray(y) ** 2)) for y in jax.tree.leaves(b))) ** 0.5


def test_chunks_split_rows_strided_and_join_back():
  x = np.arange(12).reshape(6, 2)
  chunks = grad_cache.split_chunks(x, 3)
  assert chunks[1].tolist() == [[2, 3], [8, 9]]
  assert np.array_equal(grad_cache.join_chunks(chunks), x)


@pytest.mark.parametrize("accum_steps", [4])  # k=2 gave 8.5e-7 too (BUILD_NOTES)
def test_grad_cache_equals_the_full_batch_gradient(stage, accum_steps):
  experiment, params, forward, objective, batch, rng = stage
  loss_fn = lambda p, b, r: objective(forward(p, b, r), b)
  with jax.set_mesh(experiment.mesh):
    (loss, metrics), full = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, rng)
    grad_fn = jax.jit(grad_cache.make_grad_cache_fn(forward, objective, accum_steps))
    (cached_loss, cached_metrics), cached, _ = grad_fn(params, batch, None, rng)
  assert float(metrics["loss/contrastive/image-text"]) > 0 and float(metrics["loss/pretrain/image"]) > 0
  np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(cached_metrics["loss/contrastive/image-text"]),
                             float(metrics["loss/contrastive/image-text"]), rtol=1e-6)
  assert jax.tree.structure(cached) == jax.tree.structure(full)
  rel = _rel(cached, full)
  print(f"accum_steps={accum_steps}: relative gradient difference {rel:.1e}")
  assert rel <= 1e-5


def test_accum_steps_must_divide_the_batch(stage):
  experiment, params, forward, objective, batch, rng = stage
  with pytest.raises(ValueError, match="accum_steps=5 does not divide the global batch of 32"):
    with jax.set_mesh(experiment.mesh):
      jax.jit(grad_cache.make_grad_cache_fn(forward, objective, 5))(params, batch, None, rng)
  with pytest.raises(ValueError, match="accum_steps must be >= 1"):
    grad_cache.make_grad_cache_fn(forward, objective, 0)


def test_bench_memory_falls_with_accum_steps():
  config = load_experiment(f"{ROOT / TINY}", [*OVERRIDES, "--config.batch_size=512"])  # activations dominate
  result = grad_cache_bench.measure(config, "align", [4])
  assert result["batch_size"] == 512 and result["stage"] == "align" and result["num_devices"] == 8
  print({k: result[k]["temp_bytes"] for k in ("plain", "k=4")})
  assert result["k=4"]["temp_bytes"] < 0.5 * result["plain"]["temp_bytes"]
  assert result["k=4"]["argument_bytes"] == result["plain"]["argument_bytes"]


OWN_DATA = pathlib.Path(__file__).parents[1] / "experiments" / "own_data.py"


def write_manifest(root: pathlib.Path, count: int = 24, size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """`count` random RGB PNGs with one caption each, as an own-data JSONL manifest."""
  rng = np.random.default_rng(0)
  (root / "img").mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    rows.append({"image": f"img/{i}.png", "text": [f"a photo of thing number {i}"]})
  (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root / "manifest.jsonl"


def test_accum_steps_trains_like_the_full_batch_through_crucible_train(tmp_path):
  """`stages.align.accum_steps=2` (GradCache over the 8-device mesh's 2 rows each) gives the losses of plain
  autodiff step for step: the same gradients, so the same updates."""
  manifest = write_manifest(tmp_path)
  losses = {}
  for k in (1, 2):
    args = ["train", "--config", f"{OWN_DATA}:tiny", f"--config.data.manifest={manifest}", "--config.eval_splits=()",
            "--config.stages.align.steps=3", "--config.stages.align.warmup=0", "--config.log_every=1",
            f"--config.stages.align.accum_steps={k}", "--workdir", str(tmp_path / f"k{k}")]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
    losses[k] = [r["loss"] for r in rows if "loss" in r]
  print(f"losses k=1 {losses[1]}, k=2 {losses[2]}")
  assert len(losses[1]) == 3 and losses[1][0] != losses[1][2]
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("--config.stages.align.accum_steps=0", "accum_steps=0 must be an integer >= 1"),
    ("--config.stages.align.accum_steps=3", "accum_steps=3 does not divide the 2 rows per device"),
    ("--config.compression.method=int8", "cannot be combined with compression.method='int8'"),
    ("--config.precision.compute=float16", "cannot be combined with float16 compute"),
])
def test_bad_accum_steps_is_a_config_error(tmp_path, override, message):
  manifest = write_manifest(tmp_path, count=2)
  args = [f"--config.data.manifest={manifest}", "--config.mesh={'data': 8, 'fsdp': 1, 'tensor': 1}",
          *(["--config.stages.align.accum_steps=2"] if "accum_steps" not in override else []), override]
  with pytest.raises(ConfigError, match=message):
    load_experiment(f"{OWN_DATA}:tiny", args)
