"""One train step gives the same loss and gradients on 1 device and on a (data=2, fsdp=2, tensor=2) mesh;
FSDP really splits the real model's params; bad meshes and batches fail before compiling."""

import pathlib

import jax
import numpy as np
import pytest

from crucible_jax.bench.step import random_batch
from crucible_jax.config import load_experiment
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.train import step as step_lib
from crucible_jax.train.setup import Experiment

CLIP = str(pathlib.Path(__file__).parent.parent / "experiments" / "clip_bench.py")
SMALL = ["--config.batch_size=16", "--config.data.image_size=(16, 16)", "--config.model.image.size=(16, 16)",
         "--config.model.image.patch=(4, 4)"]
for _tower in ("image", "text"):
  SMALL += [f"--config.model.{_tower}.width=32", f"--config.model.{_tower}.heads=2", f"--config.model.{_tower}.mlp=64",
            f"--config.model.{_tower}.depth=1"]
SMALL += ["--config.model.joint_dim=32"]  # the text vocabulary is the byte tokenizer's (data.tokenizer)


def _experiment(layout: str, axes: dict[str, int]) -> Experiment:
  overrides = SMALL + [f"--config.sharding.layout={layout}"] + [f"--config.mesh.{k}={v}" for k, v in axes.items()]
  config = load_experiment(CLIP, overrides)
  devices = jax.devices()[: int(np.prod(list(axes.values())))]
  return Experiment(config, build_mesh(axes, devices=devices))


def _loss_and_grads(experiment: Experiment):
  plan = experiment.plans[0]
  _, frozen, heads, objective = experiment.stage_parts(plan)
  loss_fn = step_lib.make_loss_fn(experiment.model, objective, heads, frozen, experiment.rules)
  params = experiment.init_params(jax.random.key(0))
  batch = jax.device_put(random_batch(experiment, seed=3), experiment.batch_sharding)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                    in_shardings=(experiment.param_shardings, experiment.batch_sharding, experiment.replicated),
                    out_shardings=((experiment.replicated, experiment.replicated), experiment.param_shardings))
  with jax.set_mesh(experiment.mesh):
    (loss, _), grads = grad_fn(params, batch, jax.random.key(1))
  return params, float(loss), grads


@pytest.fixture(scope="module")
def single_device():
  return _loss_and_grads(_experiment("dp", {"data": 1, "fsdp": 1, "tensor": 1}))


@pytest.fixture(scope="module")
def three_axis():
  return _loss_and_grads(_experiment("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}))


def test_same_loss_and_grads_on_one_device_and_a_3d_mesh(single_device, three_axis):
  params_1, loss_1, grads_1 = single_device
  params_8, loss_8, grads_8 = three_axis
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # init does not depend on the layout
  assert abs(loss_1 - loss_8) <= 1e-5 * max(1.0, abs(loss_1))
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(grads_1)[0], jax.tree.leaves(grads_1),
                        jax.tree.leaves(grads_8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path[0]))


def test_fsdp_tp_params_are_really_split(three_axis):
  params, _, _ = three_axis
  big = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if leaf.size >= 1024]
  assert big
  for path, leaf in big:
    shard = leaf.sharding.shard_shape(leaf.shape)
    assert np.prod(shard) < leaf.size, f"{jax.tree_util.keystr(path)} {leaf.shape} is not split"


def test_fsdp_splits_every_large_param_eightfold():
  experiment = _experiment("fsdp", {"data": 1, "fsdp": 8, "tensor": 1})
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          experiment.abstract_params, experiment.param_shardings)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if leaf.size >= 4096:
      shard = leaf.sharding.shard_shape(leaf.shape)
      assert np.prod(shard) * 8 == leaf.size, f"{jax.tree_util.keystr(path)} {leaf.shape} → {shard}"


def test_mesh_that_does_not_fit_the_devices_is_rejected():
  with pytest.raises(ValueError, match="mesh|devices"):
    build_mesh({"data": 3, "fsdp": 1, "tensor": 1})


def test_batch_not_divisible_by_data_axes_is_rejected_before_compiling():
  config = load_experiment(CLIP, SMALL + ["--config.batch_size=12", "--config.mesh.data=-1"])  # 8 devices
  with pytest.raises(ValueError, match="batch_size"):
    Experiment(config, build_mesh({"data": 8}))
