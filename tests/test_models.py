"""Model behaviour: shapes/dtypes, logical names, cross-modal information flow, fusion masks, audio front end."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crucible_jax.common_types import MODALITIES
from crucible_jax.models import ALL_HEADS, build_model, default_model_config, example_batch
from crucible_jax.models.cross_attention import BidirectionalFusionBlock, CrossModalAttention
from crucible_jax.models.encoders import AudioEncoder, max_pool_2x2
from crucible_jax.models.fusion import AdaptiveFusion
from crucible_jax.models.heads import ClassifierHead, SlotAnswerHead
from crucible_jax.models.melspec import log_mel_spectrogram

B = 2
KEY = jax.random.key(0, impl="rbg")  # RngBitGenerator keys: init compiles much faster than threefry


def _abstract(cfg, heads=ALL_HEADS):
  """(model, abstract boxed variables, abstract outputs) without compiling anything."""
  model = build_model(cfg)
  batch = example_batch(cfg, B)
  variables = jax.eval_shape(model.init, KEY, batch)
  outputs = jax.eval_shape(lambda v, b: model.apply(v, b, heads=heads), variables, batch)
  encoded = jax.eval_shape(lambda v, b: model.apply(v, b, method="encode"), variables, batch)
  return model, variables, outputs, encoded


@pytest.fixture(scope="module")
def abstract_default():
  return _abstract(default_model_config())


def test_output_shapes_and_dtypes(abstract_default):
  _, _, out, encoded = abstract_default
  expected_tokens = {"image": (16 // 4) * (64 // 4), "video": 4 * 4 * 4, "audio": 200 // 4, "text": 48}
  for m, n in expected_tokens.items():
    tokens, mask = encoded[m]
    assert (tokens.shape, tokens.dtype) == ((B, n, 32), jnp.float32), m
    assert (mask.shape, mask.dtype) == ((B, n), jnp.bool_), m
    assert out["embeddings"][m].shape == (B, 32)
    assert out["pretrain_logits"][m].shape == (B, 4, 11)
    assert out["present"][m].shape == (B,) and out["present"][m].dtype == jnp.bool_
  assert out["logit_scale"].shape == () and out["logit_bias"].dtype == jnp.float32
  assert out["vqa_logits"].shape == (B, 48)
  assert out["tag_logits"].shape == (B, 10)
  assert out["ctc_logits"].shape == (B, 50, 11) and out["ctc_mask"].shape == (B, 50)
  assert out["fused_logits"].shape == (B, 4, 11) and out["fusion_weights"].shape == (B, 4)


def test_heads_select_outputs():
  cfg = default_model_config()
  cfg.modalities = ("audio",)
  _, _, out, _ = _abstract(cfg, heads=("tagging",))
  assert set(out) == {"present", "tag_logits"}


def test_bf16_activations_f32_embeddings_and_per_family_override():
  cfg = default_model_config()
  cfg.dtype = "bfloat16"
  cfg.image.dtype = "float32"
  _, variables, out, encoded = _abstract(cfg)
  assert encoded["text"][0].dtype == jnp.bfloat16
  assert encoded["audio"][0].dtype == jnp.bfloat16
  assert encoded["image"][0].dtype == jnp.float32
  assert all(e.dtype == jnp.float32 for e in out["embeddings"].values())
  assert out["vqa_logits"].dtype == jnp.float32 and out["ctc_logits"].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))


def test_every_param_has_logical_axis_names(abstract_default):
  _, variables, _, _ = abstract_default
  specs = nn.get_partition_spec(variables)["params"]
  shapes = nn.unbox(variables)["params"]
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec))
  unnamed = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    spec = flat_specs[path]
    if leaf.ndim >= 1 and (len(spec) != leaf.ndim or all(name is None for name in spec)):
      unnamed.append(jax.tree_util.keystr(path))
  assert not unnamed, unnamed
  assert len(flat_specs) > 50


def test_concat_ablation_has_no_cross_attention_params():
  cfg = default_model_config()
  cfg.fusion.cross_attention = False
  _, variables, out, _ = _abstract(cfg)
  assert not any(k.startswith("vqa_blocks") for k in variables["params"])
  assert out["vqa_logits"].shape == (B, 48)


def test_image_text_model_runs_and_is_finite():
  """A real forward pass (init + apply compiled once); heads limited to keep the compile short."""
  cfg = default_model_config()
  cfg.modalities = ("image", "text")
  model = build_model(cfg)
  batch = example_batch(cfg, B)
  rng = np.random.default_rng(0)
  batch["image"] = jnp.asarray(rng.uniform(size=batch["image"].shape), jnp.float32)
  batch["text"] = batch["text"].at[1, 5:].set(0)
  batch["image_present"] = jnp.array([True, False])
  heads = ("embed", "fused")
  out = jax.jit(lambda key, b: model.apply(model.init(key, b, heads=heads), b, heads=heads))(KEY, batch)
  assert set(out) == {"present", "embeddings", "logit_scale", "logit_bias", "fused_logits", "fusion_weights"}
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  for m, e in out["embeddings"].items():  # unit norm where present; an absent image is masked, as a skipped one
    norms, present = np.asarray(jnp.linalg.norm(e, axis=-1)), np.asarray(out["present"][m])
    np.testing.assert_allclose(norms[present], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(norms[~present], 0.0)
  np.testing.assert_allclose(out["logit_scale"], math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(out["logit_bias"], -10.0)
  weights = np.asarray(out["fusion_weights"])  # order: image, text
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert weights[1, 0] == 0.0


def test_extra_questions_are_answered_about_their_own_samples_image_in_training_only():
  cfg = default_model_config()
  cfg.modalities = ("image", "text")
  model = build_model(cfg)
  rng = np.random.default_rng(1)
  batch = example_batch(cfg, B)
  batch["image"] = jnp.asarray(rng.uniform(size=batch["image"].shape), jnp.float32)
  batch["question"] = jnp.asarray(rng.integers(1, 200, batch["question"].shape), jnp.int32)
  other = jnp.asarray(rng.integers(1, 200, batch["question"].shape), jnp.int32)
  batch["extra_questions"] = jnp.stack([other, batch["question"], other[::-1]], axis=1)  # [B, 3, L]
  heads = ("vqa",)

  @jax.jit
  def run(key, b):
    variables = model.init(key, b, heads=heads)
    return model.apply(variables, b, heads=heads, train=True), model.apply(variables, b, heads=heads)

  trained, evaluated = run(KEY, batch)
  extra = trained["vqa_extra_logits"]
  assert extra.shape == (B, 3, cfg.heads.num_answers) and "vqa_extra_logits" not in evaluated
  np.testing.assert_allclose(trained["vqa_logits"], evaluated["vqa_logits"], rtol=1e-5, atol=1e-5)  # one batched pass
  np.testing.assert_allclose(extra[:, 1], trained["vqa_logits"], rtol=1e-5, atol=1e-5)  # same question, same image
  assert float(jnp.abs(extra[0, 0] - extra[1, 2]).max()) > 1e-4  # one question (other[0]), two images: two answers


def test_slot_answer_head_reads_each_slot_by_its_index_and_the_question():
  head = SlotAnswerHead(num_classes=7, hidden=16)
  rng = np.random.default_rng(4)
  question, slots = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 8), (3, 5, 12)))
  params = head.init(KEY, question, slots)
  logits = head.apply(params, question, slots)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  other_order = head.apply(params, question, slots[:, ::-1])  # same digits, other positions: "the n-th" differs
  other_question = head.apply(params, question[::-1], slots)
  assert float(jnp.abs(other_order - logits).max()) > 1e-4 and float(jnp.abs(other_question - logits).max()) > 1e-4
  cfg = default_model_config()
  cfg.modalities, cfg.heads.vqa_reader = ("image", "text"), "slots"
  model = build_model(cfg)
  batch = example_batch(cfg, B)
  variables = jax.jit(lambda b: model.init(KEY, b, heads=("vqa",)))(batch)
  assert "vqa_head" in variables["params"] and "message_in" in variables["params"]["vqa_head"]
  assert model.apply(variables, batch, heads=("vqa",))["vqa_logits"].shape == (B, cfg.heads.num_answers)


def test_classifier_head_without_normalization_keeps_the_inputs_scale():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8)), jnp.float32)
  x = x - x.mean(axis=-1, keepdims=True)  # zero-mean rows: LN maps x and 3x to the same vector
  for normalize, scale_matters in ((True, False), (False, True)):
    head = ClassifierHead(num_classes=5, hidden=16, normalize=normalize)
    params = head.init(KEY, x)
    gap = float(jnp.abs(head.apply(params, 3 * x) - head.apply(params, x)).max())
    assert (gap > 1e-3) == scale_matters, (normalize, gap)
  slot_head = SlotAnswerHead(num_classes=5, hidden=16).init(KEY, x, jnp.ones((2, 3, 8)))
  assert "ln" not in slot_head["params"]["answer"]  # a Deep Sets sum keeps its magnitude


@pytest.fixture(scope="module")
def cross_attention():
  module = CrossModalAttention(num_heads=2, gated=False)
  a, b = jnp.ones((2, 3, 16)), jnp.ones((2, 5, 16))
  params = jax.jit(module.init)(KEY, a, b, jnp.ones((2, 5), bool))
  return jax.jit(lambda a, b, mask: module.apply(params, a, b, mask))


def test_cross_attention_reads_valid_keys_only(cross_attention):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  b = rng.normal(size=(2, 5, 16)).astype(np.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  base = cross_attention(a, jnp.asarray(b), mask)
  changed_valid, changed_masked = b.copy(), b.copy()
  changed_valid[:, 0] += rng.normal(size=(2, 16))
  changed_masked[:, 4] = 100.0
  changed_masked[0, 3] = -100.0
  assert np.abs(cross_attention(a, jnp.asarray(changed_valid), mask) - base).max(axis=(1, 2)).min() > 1e-3
  np.testing.assert_allclose(cross_attention(a, jnp.asarray(changed_masked), mask), base, atol=1e-6)
  empty = cross_attention(a, jnp.asarray(b), jnp.zeros((2, 5), bool))
  np.testing.assert_allclose(empty, a, atol=1e-6)  # no valid key: the residual passes A through


def test_gated_fusion_block_is_identity_at_init_and_opens_with_the_gate():
  block = BidirectionalFusionBlock(2, 32, 2, 32, gated=True)
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
  a_mask, b_mask = jnp.ones((2, 3), bool), jnp.ones((2, 4), bool)
  params = jax.jit(block.init)(KEY, a, a_mask, b, b_mask)
  apply = jax.jit(block.apply)
  new_a, new_b = apply(params, a, a_mask, b, b_mask)
  np.testing.assert_array_equal(new_a, a)
  np.testing.assert_array_equal(new_b, b)
  gates = [p for p in jax.tree_util.tree_leaves_with_path(nn.unbox(params)) if "gate" in jax.tree_util.keystr(p[0])]
  assert len(gates) == 4
  opened = jax.tree.map(lambda x: jnp.ones_like(x) if x.ndim == 0 else x, nn.unbox(params))
  new_a, _ = apply(opened, a, a_mask, b, b_mask)
  moved_a, _ = apply(opened, a, a_mask, b * jnp.arange(1.0, 17.0), b_mask)
  assert np.abs(new_a - a).max() > 1e-3 and np.abs(moved_a - new_a).max() > 1e-3


@pytest.fixture(scope="module")
def fusion():
  module = AdaptiveFusion(("image", "text", "audio"))
  features = {m: jnp.ones((3, 16)) for m in module.modalities}
  present = {m: jnp.ones((3,), bool) for m in module.modalities}
  params = jax.jit(module.init)(KEY, features, present)
  return jax.jit(lambda f, p: module.apply(params, f, p))


def test_adaptive_fusion_masks_missing_modalities(fusion):
  rng = np.random.default_rng(3)
  features = {m: rng.normal(size=(3, 16)).astype(np.float32) for m in ("image", "text", "audio")}
  present = {"image": np.array([1, 1, 0], bool), "text": np.array([1, 1, 0], bool), "audio": np.array([1, 0, 0], bool)}
  fused, weights = fusion(features, present)
  assert weights.shape == (3, 3) and fused.shape == (3, 16)
  assert np.all(np.isfinite(fused)) and np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights[:2].sum(-1), 1.0, rtol=1e-6)
  assert weights[1, 2] == 0.0 and np.all(weights[0] > 0)
  np.testing.assert_array_equal(fused[2], 0.0)
  np.testing.assert_array_equal(weights[2], 0.0)
  poisoned = dict(features, audio=features["audio"].copy())
  poisoned["audio"][1:] = np.nan
  poisoned["image"] = features["image"].copy()
  poisoned["image"][2] = 1e6
  fused2, weights2 = fusion(poisoned, present)
  np.testing.assert_array_equal(fused2[1:], fused[1:])
  np.testing.assert_array_equal(weights2[1:], weights[1:])


def test_adaptive_fusion_rejects_unordered_modalities():
  module = AdaptiveFusion(("text", "image"))
  with pytest.raises(ValueError, match="order"):
    features, present = {m: jnp.ones((1, 8)) for m in MODALITIES}, {m: jnp.ones((1,), bool) for m in MODALITIES}
    jax.eval_shape(module.init, KEY, features, present)


def _mel_hz_centers(sample_rate: int, n_mels: int) -> np.ndarray:
  mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)
  points = np.linspace(0.0, mel(sample_rate / 2), n_mels + 2)
  return (700.0 * (10.0 ** (points / 2595.0) - 1.0))[1:-1]


def test_log_mel_of_pure_tone_peaks_in_its_mel_bin():
  sr, tones = 8000, np.array([440.0, 2500.0])
  t = np.arange(4000) / sr
  wave = jnp.asarray(np.sin(2 * np.pi * tones[:, None] * t[None]), jnp.float32)
  lengths = jnp.array([4000, 2000], jnp.int32)
  fn = jax.jit(lambda w, n: log_mel_spectrogram(w, n, sample_rate=sr, n_fft=512, hop=160, n_mels=32))
  log_mel, mask = fn(wave, lengths)
  assert log_mel.shape == (2, 25, 32) and mask.shape == (2, 25)
  np.testing.assert_array_equal(mask.sum(-1), [25, 13])
  np.testing.assert_array_equal(log_mel[1, 13:], 0.0)
  centers = _mel_hz_centers(sr, 32)
  for i, tone in enumerate(tones):
    peak = np.asarray(log_mel[i, : int(mask[i].sum()) - 3]).mean(0).argmax()
    assert peak == np.abs(centers - tone).argmin(), (tone, peak)


def test_audio_padding_beyond_lengths_does_not_change_valid_tokens():
  encoder = AudioEncoder(width=16, depth=1, num_heads=2, mlp_dim=32, sample_rate=8000, n_fft=256, hop=80, n_mels=16)
  rng = np.random.default_rng(4)
  wave = rng.normal(size=(2, 2000)).astype(np.float32)
  lengths = jnp.array([1100, 2000], jnp.int32)
  params = jax.jit(encoder.init)(KEY, jnp.asarray(wave), lengths)
  apply = jax.jit(encoder.apply)
  tokens, mask = apply(params, jnp.asarray(wave), lengths)
  noisy = wave.copy()
  noisy[0, 1100:] = 50.0 * rng.normal(size=900)
  tokens2, mask2 = apply(params, jnp.asarray(noisy), lengths)
  np.testing.assert_array_equal(mask, mask2)
  np.testing.assert_array_equal(mask.sum(-1), [math.ceil(1100 / 80 / 4), 2000 // 80 // 4])
  np.testing.assert_allclose(tokens2[mask], tokens[mask], atol=1e-5)
  changed = wave.copy()
  changed[0, :100] += 1.0
  tokens3, _ = apply(params, jnp.asarray(changed), lengths)
  assert np.abs(tokens3[0] - tokens[0]).max() > 1e-3


@pytest.mark.parametrize("shape", [(2, 16, 64, 3), (3, 7, 9, 2)])
def test_max_pool_2x2_equals_flax_max_pool_and_routes_the_gradient_to_the_maximum(shape):
  x = jax.random.normal(jax.random.key(0), shape)  # odd sizes: the last row/column is dropped, as by nn.max_pool
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  grad = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * 2.0))(x)
  np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * 2.0))(x))


def test_conv_stems_pool_the_grid_before_patchifying():
  cfg = default_model_config()
  cfg.image.update(stem=(8, 16), stem_convs=2, patch=(4, 1))  # 16x64 -> 4x16 -> 16 column tokens
  cfg.video.update(stem=(8,), tubelet=(2, 4, 4))  # 16x16 frames -> 8x8 -> 4 x 2 x 2 tubelets
  cfg.audio.update(stem=(8,), patch_frames=4)  # 200 log-mel frames -> 100 -> 25 tokens
  model, variables, _, encoded = _abstract(cfg)
  assert {m: encoded[m][0].shape[1] for m in ("image", "video", "audio")} == {"image": 16, "video": 16, "audio": 25}
  stem = nn.unbox(variables)["params"]["encoders_image"]["stem"]
  kernels = {name: conv["kernel"].shape for name, conv in stem.items()}
  assert kernels == {"conv_0": (3, 3, 1, 8), "conv_0_1": (3, 3, 8, 8), "conv_1": (3, 3, 8, 16),
                     "conv_1_1": (3, 3, 16, 16)}  # stem_convs=2: a second 3x3 conv in each stage, before its pool
  assert set(nn.unbox(variables)["params"]["encoders_video"]["stem"]) == {"conv_0"}
  assert "stem" not in nn.unbox(variables)["params"]["encoders_text"]


def test_attention_projections_are_initialised_with_the_embed_fan_in():
  from crucible_jax.models.layers import HeadMerge, HeadProjection
  width, heads = 256, 8
  x = jnp.ones((1, 1, width))
  for count in (1, 3):
    kernel = nn.unbox(HeadProjection(heads, width // heads, count=count).init(KEY, x))["params"]["kernel"]
    assert abs(float(jnp.std(kernel)) * math.sqrt(width) - 1.0) < 0.1, count  # lecun: var 1/fan_in, fan_in = embed
  merge = nn.unbox(HeadMerge(width).init(KEY, jnp.ones((1, 1, heads, width // heads))))["params"]["kernel"]
  assert abs(float(jnp.std(merge)) * math.sqrt(width) - 1.0) < 0.1


def test_pos_std_sets_each_towers_positional_init_scale():
  cfg = default_model_config()
  cfg.modalities = ("image", "text")
  cfg.image.pos_std, cfg.text.pos_std = 0.5, 0.02
  model = build_model(cfg)
  params = nn.unbox(jax.jit(lambda b: model.init(KEY, b, heads=("pretrain",)))(example_batch(cfg, B)))["params"]
  ratio = 0.5 / 0.02
  assert params["encoders_image"]["encoder"]["pos_embedding"].shape[0] > 1
  stds = {m: float(jnp.std(params[f"encoders_{m}"]["encoder"]["pos_embedding"])) for m in ("image", "text")}
  assert stds["image"] / stds["text"] == pytest.approx(ratio, rel=0.3)


@pytest.mark.parametrize(
    "edit, culprit",
    [
        (lambda c: setattr(c, "modalities", ("image", "smell")), "modalities"),
        (lambda c: setattr(c.image, "heads", 3), "image.width"),
        (lambda c: setattr(c.image, "patch", (5, 4)), "image.patch"),
        (lambda c: setattr(c.video, "tubelet", (3, 4, 4)), "video.tubelet"),
        (lambda c: setattr(c, "dtype", "float64"), "dtype"),
        (lambda c: setattr(c.text, "dtype", "int8"), "text.dtype"),
        (lambda c: setattr(c.audio, "width", 64), "audio.width"),
        (lambda c: setattr(c.fusion, "question_len", 64), "fusion.question_len"),
        (lambda c: c.heads.__delattr__("num_answers"), "heads.num_answers"),
        (lambda c: setattr(c.image, "stem", (8, 8, 8)), "image.patch"),  # 16x64 pooled thrice: 2x8, patch 4x4
        (lambda c: setattr(c.image, "stem", (8, 0)), "image.stem"),
        (lambda c: setattr(c.video, "stem_convs", 0), "video.stem_convs"),
        (lambda c: setattr(c.text, "stem", (8,)), "text.stem"),
        (lambda c: c.audio.update(stem=(8,) * 6, patch_frames=1), "audio.n_mels"),
        (lambda c: setattr(c.audio, "stem", (8,) * 6), "audio.seconds"),
        (lambda c: setattr(c.video, "pos_std", 0.0), "video.pos_std"),
        (lambda c: setattr(c.heads, "vqa_reader", "mean"), "heads.vqa_reader"),
        (lambda c: setattr(c, "attention", "flash"), "attention"),
        (lambda c: setattr(c, "attention", "cudnn"), "cudnn"),  # f32 compute: cuDNN fuses only bf16/f16
    ],
)
def test_build_model_rejects_bad_configs_naming_the_key(edit, culprit):
  cfg = default_model_config()
  edit(cfg)
  with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
    build_model(cfg)
