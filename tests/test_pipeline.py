"""The grain pipeline: schema-valid batches, exact resume, per-process sharding, eval coverage, global arrays."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from crucible_jax.common_types import MODALITIES
from crucible_jax.data import loader, registry
from crucible_jax.data.tokenizers import byte
from crucible_jax.data.digit_world import builder, pipeline, render, templates
from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.data.schema import BATCH_SCHEMA, check_batch

SIZES = dict(train_size=300, val_size=60, test_size=60, heldout_size=60)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path_factory.mktemp("pipeline"))
  cfg.update(SIZES)
  builder.prepare_digit_world(cfg)
  return cfg


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    assert batch.keys() == other.keys()
    for key in batch:
      assert batch[key].tobytes() == other[key].tobytes(), key


def test_config_has_the_documented_layout():
  cfg = default_data_config()
  assert cfg.data_dir is None and cfg.image_size == (16, 64) and cfg.audio_seconds == 4.0
  assert (cfg.train_size, cfg.val_size, cfg.test_size, cfg.heldout_size) == (20000, 2000, 2000, 2000)
  assert set(cfg.drop_modalities) == set(MODALITIES)


def test_train_batches_follow_the_schema(cfg):
  iterator = pipeline.make_train_iterator(cfg, global_batch=8, seed=0, process_index=0, process_count=1)
  for batch in _take(iterator, 2):
    check_batch(batch, required=tuple(BATCH_SCHEMA))
    assert batch["image"].shape == (8, 16, 64, 1) and batch["audio"].shape == (8, 32000)
    assert (batch["weight"] == 1).all() and batch["image_present"].all()


def test_resume_from_state_is_exact(cfg):
  iterator = pipeline.make_train_iterator(cfg, global_batch=8, seed=7, process_index=0, process_count=1)
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  restored = pipeline.make_train_iterator(cfg, global_batch=8, seed=7, process_index=0, process_count=1)
  restored.set_state(state)
  _assert_same(_take(restored, 3), expected)
  other_seed = pipeline.make_train_iterator(cfg, global_batch=8, seed=8, process_index=0, process_count=1)
  assert not np.array_equal(next(other_seed)["string_id"], _take(restored, 1)[0]["string_id"])


def test_process_shards_cover_each_epoch_exactly_once(cfg):
  shards = [pipeline.train_recipes(cfg, seed=1, process_index=p, process_count=2) for p in range(2)]
  for epoch in range(2):
    seen = []
    for shard in shards:
      items = [shard[i] for i in range(epoch * 150, (epoch + 1) * 150)]
      assert all(e == epoch for e, _ in items)
      seen += [int(recipe["index"]) for _, recipe in items]
    assert sorted(seen) == list(range(300))  # union is the dataset, no overlap
  first_epoch = [int(shards[0][i][1]["index"]) for i in range(150)]
  second_epoch = [int(shards[0][i][1]["index"]) for i in range(150, 300)]
  assert first_epoch != second_epoch  # reshuffled every epoch


def test_per_process_batches_are_local_and_distinct(cfg):
  batches = [next(pipeline.make_train_iterator(cfg, global_batch=8, seed=2, process_index=p, process_count=2))
             for p in range(2)]
  assert batches[0]["image"].shape[0] == 4
  assert not np.array_equal(batches[0]["audio"], batches[1]["audio"])
  whole = next(pipeline.make_train_iterator(cfg, global_batch=8, seed=2, process_index=0, process_count=1))
  for key in whole:  # the processes' blocks, in process order, are the one-process batch
    np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), whole[key], err_msg=key)
  with pytest.raises(ValueError, match="global_batch"):
    pipeline.make_train_iterator(cfg, global_batch=5, seed=2, process_index=0, process_count=2)


def test_eval_batches_cover_every_sample_once(cfg):
  batches = list(pipeline.make_eval_batches(cfg, "val", batch_size=16, process_index=0, process_count=1))
  assert len(batches) == 4  # 60 samples: 3 full batches + 12 real and 4 padding
  for batch in batches:
    check_batch(batch, required=tuple(BATCH_SCHEMA))
  merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = merged["weight"] > 0
  assert real.sum() == 60 == pipeline.num_examples(cfg, "val") and real[:60].all()
  for m in MODALITIES:
    assert not merged[f"{m}_present"][60:].any() and merged[f"{m}_present"][:60].all()
  assert (merged["image"][60:] == 0).all() and (merged["digits"][60:] == -1).all()
  source = builder.digit_world_source(cfg, "val")
  for i in (0, 31, 59):  # sample i is record i, rendered with the eval seed
    expected = render.render_sample(source[i], cfg, split_seed=cfg.seed, epoch=0)
    assert all(np.array_equal(merged[k][i], expected[k]) for k in expected)
  again = list(pipeline.make_eval_batches(cfg, "val", batch_size=16, process_index=0, process_count=1))
  _assert_same(again, batches)


def test_caption_targets_are_rendered_on_request_and_read_through_the_registry(cfg):
  """`data.caption_len` adds each sample's canonical caption (the converter's target); padding rows are empty."""
  assert "caption" not in next(iter(pipeline.make_eval_batches(cfg, "val", batch_size=16)))
  captioned = cfg.copy_and_resolve_references()
  captioned.caption_len = 24
  batches = list(registry.make_eval_batches(captioned, "val", batch_size=16, process_index=0, process_count=1))
  check_batch(batches[-1], required=("caption",))
  merged = {k: np.concatenate([b[k] for b in batches]) for k in ("caption", "digits")}
  for row in (0, 59):
    text = " ".join(templates.ENGLISH_WORDS[d] for d in merged["digits"][row] if d >= 0)
    assert byte.ByteTokenizer(1).decode(merged["caption"][row]) == text
    assert merged["caption"][row, len(text)] == byte.EOS and not merged["caption"][row, len(text) + 1:].any()
  assert not merged["caption"][60:].any()
  captioned.caption_len = 23  # shorter than a 4-digit caption
  with pytest.raises(ValueError, match="data.caption_len=23"):
    registry.validate(captioned)


def test_eval_batches_split_across_processes(cfg):
  whole = list(pipeline.make_eval_batches(cfg, "test", batch_size=16, process_index=0, process_count=1))
  parts = [list(pipeline.make_eval_batches(cfg, "test", batch_size=16, process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for b, full in enumerate(whole):
    joined = {k: np.concatenate([parts[0][b][k], parts[1][b][k]]) for k in full}
    _assert_same([joined], [full])


def test_drop_modalities_hides_data(cfg):
  dropping = cfg.copy_and_resolve_references()
  dropping.drop_modalities.audio = 1.0
  batch = next(pipeline.make_train_iterator(dropping, global_batch=8, seed=0, process_index=0, process_count=1))
  assert not batch["audio_present"].any() and (batch["audio"] == 0).all() and (batch["audio_len"] == 0).all()
  assert batch["image_present"].all() and batch["text_present"].all()
  everything = cfg.copy_and_resolve_references()
  everything.drop_modalities.update({m: 1.0 for m in MODALITIES})
  batch = next(pipeline.make_train_iterator(everything, global_batch=8, seed=0, process_index=0,
                                            process_count=1))
  present = np.stack([batch[f"{m}_present"] for m in MODALITIES], axis=1)
  assert (present.sum(axis=1) == 1).all()  # one modality always survives
  with pytest.raises(ValueError, match="smell"):
    pipeline.drop_modalities({}, {"smell": 0.5}, np.random.default_rng(0))


def test_bad_record_is_named_or_skipped(cfg):
  source = builder.digit_world_source(cfg, "val")
  broken = dict(source[4], num_digits=3, digits=np.array([1, -1, -1, -1], np.int32))
  with pytest.raises(ValueError, match="record 4"):
    pipeline._render(broken, cfg, 0, 0, "val")  # pylint: disable=protected-access
  lenient = cfg.copy_and_resolve_references()
  lenient.skip_bad_records = True
  sample = pipeline._render(broken, lenient, 0, 0, "val")  # pylint: disable=protected-access
  assert sample["weight"] == 0 and not sample["image_present"]


@pytest.mark.parametrize("field, value", [("variant", "noisy"), ("corrupt_prob", 1.5), ("audio_seconds", 2.0)])
def test_bad_config_names_the_field(cfg, field, value):
  bad = cfg.copy_and_resolve_references()
  setattr(bad, field, value)
  with pytest.raises(ValueError, match=field):
    pipeline.make_train_iterator(bad, global_batch=8, seed=0, process_index=0, process_count=1)


def test_to_global_batch_shards_the_batch_axis(cfg):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  local = next(pipeline.make_train_iterator(cfg, global_batch=16, seed=0, process_index=0, process_count=1))
  arrays = loader.to_global_batch(local, sharding)
  assert arrays.keys() == local.keys()
  for key, array in arrays.items():
    assert array.shape == local[key].shape and array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), local[key])
  assert arrays["audio"].addressable_shards[1].data.shape == (2, 32000)


def test_worker_processes_give_the_same_batches(cfg):
  with_workers = cfg.copy_and_resolve_references()
  with_workers.num_workers = 1
  iterator = pipeline.make_train_iterator(with_workers, global_batch=4, seed=5, process_index=0, process_count=1)
  try:
    got = _take(iterator, 3)
  finally:
    iterator.close()
  expected = _take(pipeline.make_train_iterator(cfg, global_batch=4, seed=5, process_index=0, process_count=1), 3)
  _assert_same(got, expected)


def test_recipe_source_equals_the_tfds_source(cfg):
  import pickle

  expected = builder.digit_world_source(cfg, "val")
  fast = pipeline.RecipeSource(cfg, "val")
  assert len(fast) == len(expected) == 60
  for i in range(len(fast)):
    got, want = fast[i], expected[i]
    assert got.keys() == want.keys()
    for key in want:
      assert type(got[key]) is type(want[key]), key
      if isinstance(want[key], np.ndarray):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
      assert np.array_equal(got[key], want[key]), (i, key)
  copy = pickle.loads(pickle.dumps(fast))  # what a worker process gets: the reader, not the loaded bytes
  assert copy._records is None and copy[7]["index"] == 7  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="split"):
    pipeline.RecipeSource(cfg, "validation")


def _step_as_weight(step, sample):
  sample["weight"] = np.float32(step)
  return sample


def test_train_batches_are_the_rendered_recipes_in_order(cfg):
  recipes = pipeline.train_recipes(cfg, seed=3, process_index=0, process_count=1)
  iterator = pipeline.make_train_iterator(cfg, global_batch=4, seed=3, process_index=0, process_count=1,
                                          sample_hook=_step_as_weight)
  for step, batch in enumerate(_take(iterator, 2)):
    for row in range(4):
      sample = pipeline._render_train(recipes[4 * step + row], data_cfg=cfg, seed=3)  # pylint: disable=protected-access
      for key in sample:
        if key != "weight":
          assert batch[key][row].tobytes() == sample[key].tobytes(), (step, row, key)
    assert (batch["weight"] == step).all()  # the hook sees the step each sample lands in
