"""The modality converter: caption targets, KV-cached vs uncached decoding, beam search, image decoder, objectives."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crucible_jax.common_types import MODALITIES
from crucible_jax.config import load_experiment
from crucible_jax.data import registry
from crucible_jax.data.tokenizers import byte
from crucible_jax.data.digit_world import targets as dw_targets
from crucible_jax.data.digit_world import tasks as dw_tasks  # noqa: F401  (registers DigitWorld's imagine term)
from crucible_jax.data.digit_world.recognizer import ImageGenerationEvaluator
from crucible_jax.eval.generation import CaptionEvaluator
from crucible_jax.models import ALL_HEADS, build_model, default_model_config, example_batch
from crucible_jax.models import converter, decoding
from crucible_jax.parallel import rules as rules_lib
from crucible_jax.parallel.mesh import build_mesh
from crucible_jax.tasks.generic import imagine_term
from crucible_jax.tasks.registry import TermContext
from crucible_jax.train import objectives

DIGIT_WORLD = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")
DIGITS = np.array([[3, 7, 1, -1], [0, -1, -1, -1], [7, 3, 8, 8]], np.int32)
NUM_DIGITS = np.array([3, 1, 4], np.int32)
MAX_LEN = 24
NEVER = -1  # an EOS id no decoder emits: decode every position
CAPTIONS = np.stack([dw_targets.caption_target(d[d >= 0], dw_targets.caption_length(4)) for d in DIGITS])


def test_caption_targets_come_from_the_batch_and_spell_the_digits():
  assert CAPTIONS.shape == (3, MAX_LEN) and CAPTIONS.dtype == np.int32
  targets, mask = converter.caption_targets({"caption": jnp.asarray(CAPTIONS)}, MAX_LEN + 4)  # padded out
  assert targets.shape == (3, MAX_LEN + 4) and not targets[:, MAX_LEN:].any()
  inputs = converter.teacher_inputs(targets)
  for row, digits in enumerate(DIGITS):
    text = dw_targets.caption_text(digits)
    assert byte.ByteTokenizer(1).decode(np.asarray(targets[row])) == text
    assert int(mask[row].sum()) == len(text) + 1  # + EOS
    assert int(inputs[row, 0]) == byte.BOS
    np.testing.assert_array_equal(inputs[row, 1:], targets[row, :-1])
  assert dw_targets.caption_text(DIGITS[2]) == "seven three eight eight"  # the longest caption fills max_len
  assert int(CAPTIONS[2, -1]) == byte.EOS
  with pytest.raises(ValueError, match="data.caption_len"):
    converter.caption_targets({"digits": jnp.asarray(DIGITS)}, MAX_LEN)
  with pytest.raises(ValueError, match="max_len=16"):
    converter.caption_targets({"caption": jnp.asarray(CAPTIONS)}, 16)


@pytest.fixture(scope="module")
def text_decoder():
  """A tiny TextDecoder, its params and a random 'source' memory for 3 samples."""
  decoder = converter.TextDecoder(byte.VOCAB_SIZE, MAX_LEN, width=32, depth=2, num_heads=2, mlp_dim=64,
                                  sources=("image",))
  keys = jax.random.split(jax.random.key(0), 3)
  memory = (jax.random.normal(keys[0], (3, 5, 16)), jnp.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], bool),
            jax.random.normal(keys[1], (3, 8)))
  tokens = jnp.full((3, MAX_LEN), byte.BOS, jnp.int32)
  params = jax.jit(lambda r: decoder.init(r, tokens, *memory, source="image"))(keys[2])["params"]
  # A random decoder is nearly uniform; sharpen the output layer so greedy, beam and cache differences show.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 30.0 if "logits" in jax.tree_util.keystr(path) else x, nn.meta.unbox(params))

  @jax.jit
  def full(inputs):
    return decoder.apply({"params": params}, inputs, *memory, source="image")

  def make_step(rows_per_sample: int = 1):
    mem = tuple(jnp.repeat(x, rows_per_sample, axis=0) for x in memory)

    def step(last, cache, index):
      variables = {"params": params} if cache is None else {"params": params, "cache": cache}
      logits, state = decoder.apply(variables, last[:, None], *mem, source="image", index=index, mutable=["cache"])
      return logits[:, 0], state["cache"]

    shapes = jax.eval_shape(step, jnp.zeros((3 * rows_per_sample,), jnp.int32), None, jnp.zeros((), jnp.int32))[1]
    return step, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  return full, make_step


def test_kv_cache_decoding_equals_decoding_without_cache(text_decoder):
  full, make_step = text_decoder
  step, cache = make_step()
  cached = jax.jit(lambda c: decoding.greedy_decode(step, c, 3, MAX_LEN, eos=NEVER))(cache)
  uncached = jax.jit(lambda: decoding.greedy_decode_reference(full, 3, MAX_LEN, eos=NEVER))()
  np.testing.assert_array_equal(cached, uncached)
  assert len(np.unique(np.asarray(cached))) > 3  # a real sequence, not one repeated token
  # Step-by-step cached logits equal the full causal forward's at every position.
  inputs = jnp.concatenate([jnp.full((3, 1), byte.BOS, jnp.int32), cached[:, :-1]], axis=1)
  per_step, jitted_step = [], jax.jit(step)
  for t in range(MAX_LEN):
    logits, cache = jitted_step(inputs[:, t], cache, jnp.asarray(t))
    per_step.append(logits)
  np.testing.assert_allclose(np.stack(per_step, axis=1), full(inputs), rtol=1e-4, atol=1e-4)


def test_beam_size_one_equals_greedy_and_beam_scores_are_true_log_probs(text_decoder):
  full, make_step = text_decoder
  step, cache = make_step()
  greedy, (beam1, _) = jax.jit(lambda c: (decoding.greedy_decode(step, c, 3, MAX_LEN),
                                           decoding.beam_search(step, c, 3, 1, MAX_LEN)))(cache)
  np.testing.assert_array_equal(greedy, beam1)
  step4, cache4 = make_step(4)
  beam4, score4 = jax.jit(lambda c: decoding.beam_search(step4, c, 3, 4, MAX_LEN))(cache4)
  # Teacher-force the returned sequences: their log-probability (up to EOS) must be the beam's reported score.
  inputs = jnp.concatenate([jnp.full((3, 1), byte.BOS, jnp.int32), beam4[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(full(inputs), axis=-1)
  token_logp = jnp.take_along_axis(logp, beam4[..., None], axis=-1)[..., 0]
  ended = jnp.cumsum(beam4 == byte.EOS, axis=1) - (beam4 == byte.EOS)  # positions after the EOS
  np.testing.assert_allclose(jnp.sum(jnp.where(ended == 0, token_logp, 0.0), axis=1), score4, rtol=1e-4, atol=1e-3)
  greedy_logp = jnp.take_along_axis(jax.nn.log_softmax(full(jnp.concatenate(
      [jnp.full((3, 1), byte.BOS, jnp.int32), greedy[:, :-1]], axis=1)), axis=-1), greedy[..., None], -1)[..., 0]
  greedy_ended = jnp.cumsum(greedy == byte.EOS, axis=1) - (greedy == byte.EOS)
  assert np.all(score4 >= jnp.sum(jnp.where(greedy_ended == 0, greedy_logp, 0.0), axis=1) - 1e-3)


@pytest.fixture(scope="module")
def tiny_model():
  """A 4-modality width-16 CrucibleModel with the converter on; its caption/imagine outputs in train and eval."""
  cfg = default_model_config()
  for m in MODALITIES:
    cfg[m].update(width=16, depth=1, heads=2, mlp=32)
  cfg.joint_dim = 16
  cfg.converter.update(enabled=True, width=16, depth=1, heads=2, mlp=32, image_width=8, caption_sources=("image",))
  model = build_model(cfg)
  batch = example_batch(cfg, 3)
  batch.update(digits=jnp.asarray(DIGITS), num_digits=jnp.asarray(NUM_DIGITS), caption=jnp.asarray(CAPTIONS))
  batch["image"] = jax.random.uniform(jax.random.key(1), batch["image"].shape)
  heads = converter.CONVERTER_HEADS

  @jax.jit
  def init_and_apply(rng, b):  # one compile for init and both applies
    p = nn.meta.unbox(model.init(rng, b, train=True, heads=heads)["params"])
    return p, model.apply({"params": p}, b, train=True, heads=heads), model.apply({"params": p}, b, heads=("imagine",))

  params, train_out, eval_images = init_and_apply(jax.random.key(0), batch)
  images = eval_images["images"]
  # The eval-mode caption head decodes (a while loop): its shapes are checked by tracing, not compiling, here.
  eval_shapes = jax.eval_shape(lambda p, b: model.apply({"params": p}, b, heads=heads), params, batch)
  return cfg, model, params, batch, train_out, dict(images=images, caption_shapes=eval_shapes["caption_ids"])


def test_image_decoder_draws_finite_images_from_every_modality(tiny_model):
  cfg, _, _, _, train_out, eval_out = tiny_model
  assert set(eval_out["images"]) == set(MODALITIES)
  for m, image in eval_out["images"].items():
    assert image.shape == (3, *cfg.image.size, 1), m
    assert np.all(np.isfinite(image)) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
  for m in cfg.converter.caption_sources:
    assert eval_out["caption_shapes"][m].shape == (3, MAX_LEN) and eval_out["caption_shapes"][m].dtype == jnp.int32
    assert train_out["caption_logits"][m].shape == (3, MAX_LEN, byte.VOCAB_SIZE)


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_tp"])
def test_decoder_params_are_named_and_shard(tiny_model, layout):
  _, model, _, batch, _, _ = tiny_model
  mesh, rules = build_mesh({"data": 2, "fsdp": 2, "tensor": 2}), rules_lib.rules_for(layout)
  init = lambda: model.init(jax.random.key(0), batch, train=True, heads=converter.CONVERTER_HEADS)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init)
    jax.eval_shape(lambda: nn.meta.unbox(init()))  # Linen applies the logical constraints while unboxing
  for name in ("caption_decoder", "image_decoder"):
    leaves = jax.tree.leaves(boxed[name], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), name
  rules_lib.logical_to_shardings(boxed, mesh, rules)


def test_converter_objective_terms(tiny_model):
  _, _, _, batch, train_out, _ = tiny_model
  spec = {"caption/image": 1.0, "imagine/text": 1.0, "imagine/image": 0.5}
  heads, objective = objectives.build_objective(spec)
  assert heads == ("caption", "imagine")
  loss, metrics = jax.jit(objective)(train_out, batch)
  assert np.isfinite(loss) and metrics["loss/caption/image"] > 1.0  # untrained: far from the targets
  targets = batch["caption"]
  perfect = dict(train_out, caption_logits={"image": 50.0 * jax.nn.one_hot(targets, byte.VOCAB_SIZE)},
                 images={"text": batch["image"]})
  _, metrics = jax.jit(objectives.build_objective({"caption/image": 1.0, "imagine/text": 1.0})[1])(perfect, batch)
  assert metrics["loss/caption/image"] < 1e-3 and metrics["acc/caption/image"] == 1.0
  assert metrics["loss/imagine/text"] == 0.0
  with pytest.raises(ValueError, match="caption_sources"):
    objectives.build_objective({"caption/audio": 1.0})[1](train_out, batch)


def test_reference_images_draw_each_digit_in_its_box_and_leave_padding_blank():
  glyphs = np.random.default_rng(0).random((10, 4, 4)).astype(np.float32)
  images = np.asarray(dw_targets.reference_images(glyphs, jnp.array([[3, 7, -1], [0, 0, 9]]), width=16))
  assert images.shape == (2, 4, 16, 1)
  np.testing.assert_array_equal(images[0, :, 0:4, 0], glyphs[3])
  np.testing.assert_array_equal(images[0, :, 4:8, 0], glyphs[7])
  np.testing.assert_array_equal(images[1, :, 8:12, 0], glyphs[9])
  assert not images[0, :, 8:].any() and not images[1, :, 12:].any()  # padding digits and spare width stay blank
  with pytest.raises(ValueError, match="do not fit"):
    dw_targets.reference_images(glyphs, jnp.zeros((1, 5), jnp.int32), width=16)


def test_reference_glyphs_are_one_distinct_centred_digit_per_class():
  from crucible_jax.data.digit_world.draw import reference_glyphs_of
  config = load_experiment(f"{DIGIT_WORLD}:tiny,generate")
  glyphs = reference_glyphs_of(config.data)
  box = config.data.image_size[0]
  assert glyphs.shape == (10, box, box) and glyphs.min() >= 0.0 and glyphs.max() <= 1.0
  assert not glyphs[:, 0].any() and not glyphs[:, :, -1].any()  # centred: a blank margin
  flat = glyphs.reshape(10, -1)
  assert min(np.abs(flat[i] - flat[j]).sum() for i in range(10) for j in range(i)) > 1.0


def test_imagine_term_targets_the_reference_hand_when_given_glyphs(tiny_model):
  _, _, _, batch, train_out, _ = tiny_model
  glyphs = np.random.default_rng(1).random((10,) + (batch["image"].shape[1],) * 2).astype(np.float32)
  reference = dw_targets.reference_images(glyphs, batch["digits"], batch["image"].shape[2])
  objective = objectives.build_objective({"imagine/text": 1.0}, reference_glyphs=glyphs)[1]
  drawn = lambda images: objective(dict(train_out, images={"text": images}), batch)[1]["loss/imagine/text"]
  assert drawn(reference) == 0.0 and drawn(batch["image"]) > 0.01  # the sample's own image is no longer the target
  with pytest.raises(ValueError, match="generic imagine task draws none"):  # glyphs need the source's imagine term
    imagine_term("text", "imagine/text", TermContext(reference_glyphs=glyphs))
  bad = load_experiment(f"{DIGIT_WORLD}:tiny,generate")
  bad.model.converter.image_target = "pixels"
  with pytest.raises(ValueError, match="image_target='pixels'"):
    build_model(bad.model)
  with pytest.raises(ValueError, match="data.name='coco' registers none"):  # the reference hand: DigitWorld's glyphs
    load_experiment(f"{DIGIT_WORLD}:tiny,generate", ["--config.data.name=coco"])


def test_generation_entry_points_and_disabled_converter(tiny_model):
  cfg, model, params, batch, _, eval_out = tiny_model
  ids = jax.jit(lambda p, b: model.apply({"params": p}, b, "image", method=converter.generate_caption))(params, batch)
  assert ids.shape == (3, MAX_LEN) and np.all((np.asarray(ids) >= 0) & (np.asarray(ids) < byte.VOCAB_SIZE))
  images = jax.jit(lambda p, b: model.apply({"params": p}, b, "audio", method=converter.generate_image))(params, batch)
  np.testing.assert_allclose(images, eval_out["images"]["audio"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="cannot caption 'text'"):
    model.apply({"params": params}, batch, "text", method=converter.generate_caption)
  off = cfg.copy_and_resolve_references()
  off.converter.enabled = False
  plain = build_model(off)
  assert "caption" not in plain.available_heads
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), batch, heads=ALL_HEADS))["params"]
  assert not {"caption_decoder", "image_decoder"} & set(shapes)


def test_caption_evaluator_accuracy_and_wer():
  evaluator = CaptionEvaluator(sources=("image",))
  ids = np.stack([byte.ByteTokenizer(MAX_LEN).encode("three seven one", add_eos=True),
                  byte.ByteTokenizer(MAX_LEN).encode("zero zero", add_eos=True),
                  byte.ByteTokenizer(MAX_LEN).encode("seven three eight eight", add_eos=True)])
  evaluator.update({"caption_ids": {"image": ids}}, {"caption": CAPTIONS, "digits": DIGITS,
                                                      "weight": np.ones(3, np.float32)})
  result = evaluator.result()
  assert result["caption_from_image/accuracy"] == pytest.approx(2 / 3)
  assert result["caption_from_image/wer"] == pytest.approx(1 / 8)  # one insertion over 8 reference words


def test_image_generation_evaluator_reads_real_images_like_the_recogniser(tmp_path):
  config = load_experiment(f"{DIGIT_WORLD}:tiny,generate")
  evaluator = ImageGenerationEvaluator(sources=("text",), recognizer_steps=3, recognizer_examples=64, grid_rows=2)
  evaluator.attach(workdir=tmp_path, data=config.data, split="val")
  assert (tmp_path / "recognizer" / "params.msgpack").exists()
  batch = next(iter(registry.make_eval_batches(config.data, "val", batch_size=16)))
  evaluator.update({"images": {"text": batch["image"]}}, batch)  # "generated" = the real images
  result = evaluator.result()
  assert result["image_from_text/accuracy"] == result["image_generation/recognizer_real_accuracy"]
  assert (tmp_path / "plots" / "generated_images_val.png").stat().st_size > 0


@pytest.mark.parametrize("variant", [":generate", ":tiny,generate"])
def test_generate_variant_parses_and_builds(variant):
  config = load_experiment(f"{DIGIT_WORLD}{variant}")
  assert config.stage_order[-1] == "generate" and config.model.converter.enabled
  assert set(build_model(config.model).available_heads) >= {"caption", "imagine"}


def test_finished_stage_params_restore_into_a_grown_model_and_saving_still_works(tmp_path):
  import types
  import grain
  from crucible_jax.train.checkpoint import Checkpointer
  iterator = iter(grain.MapDataset.source(list(range(8))).to_iter_dataset())
  next(iterator)
  state = types.SimpleNamespace(step=jnp.int32(3), params={"encoder": {"w": jnp.arange(4.0)}}, opt_state={},
                                comp_state={}, skipped=jnp.int32(0), loss_scale=None)
  checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
  checkpointer.save(3, state, iterator, {"stage_index": 0, "stage_step": 3})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  grown = {"encoder": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)},
           "caption_decoder": {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)}}
  fresh_iterator = iter(grain.MapDataset.source(list(range(8))).to_iter_dataset())
  params = checkpointer.restore_params(3, grown, fresh_iterator)
  assert set(params) == {"encoder"}  # the decoder is left to the next stage's handoff
  np.testing.assert_array_equal(params["encoder"]["w"], np.arange(4.0))
  assert next(fresh_iterator) == 1  # the data position was restored too
  checkpointer.save(4, state, iterator, {"stage_index": 1, "stage_step": 1})  # the manager can still save
  checkpointer.close()
