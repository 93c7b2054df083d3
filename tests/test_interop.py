"""Pretrained conversion: open_clip, HF CLIP and HF SigLIP models with random weights, built in their own framework
(nothing downloaded), saved, converted and compared embedding for embedding; the CLIP BPE tokenizer against
open_clip's."""

import importlib
import sys
import types

import flax.traverse_util
import jax
import numpy as np
import pytest

from crucible_jax import inference
from crucible_jax.interop import tokenizers
from crucible_jax.interop.checkpoints import read_state_dict
from crucible_jax.interop.convert import convert
from crucible_jax.train.setup import Experiment

TOL = 1e-4  # max abs difference of L2-normalised f32 embeddings (reached: ~3e-7, BUILD_NOTES)
TINY = dict(image_size=32, patch=8, width=128, layers=2, context=16)
TEXTS = ["a photo of a cat", "Two DOGS, running!", "x " * 40, ""]


def reference(module: str) -> types.ModuleType:
  """Import open_clip or transformers. PyPI's torchvision wheel is a CUDA build whose C ops fail to register
  against the CPU torch wheel; neither reference model uses those ops, so their registration is skipped."""
  try:
    importlib.import_module("torchvision")
  except RuntimeError:
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  return importlib.import_module(module)


def jitter(model) -> None:
  """Random LayerNorm scales/biases and attention biases (the frameworks init them to 1/0, hiding mix-ups)."""
  import torch
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "class_embedding" not in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


def tiny_open_clip():
  """An open_clip CLIP with random weights: 2-layer towers of width 128 (2 heads of 64), 32x32 images."""
  import torch
  open_clip = reference("open_clip")
  torch.manual_seed(0)
  model = open_clip.CLIP(
      embed_dim=64, vision_cfg=dict(image_size=TINY["image_size"], layers=TINY["layers"], width=TINY["width"],
                                    patch_size=TINY["patch"]),
      text_cfg=dict(context_length=TINY["context"], vocab_size=49408, width=TINY["width"], heads=2,
                    layers=TINY["layers"])).eval()
  jitter(model)
  return model


def save_safetensors(model, path) -> None:
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def max_diffs(converted: inference.InferenceModel, images, image_ref, ids, text_ref) -> tuple[float, float]:
  image = converted.embed("image", {"image": images.transpose(0, 2, 3, 1)})
  text = converted.embed("text", {"text": ids})
  diffs = float(np.abs(image - image_ref).max()), float(np.abs(text - text_ref).max())
  print(f"{converted.config.pretrained.source}: max abs diff image {diffs[0]:.1e}, text {diffs[1]:.1e}")
  return diffs


@pytest.fixture(scope="module")
def clip_bpe():
  open_clip = reference("open_clip")
  return tokenizers.ClipBpeTokenizer(open_clip.tokenizer.default_bpe(), TINY["context"]), open_clip


def test_clip_bpe_matches_open_clip(clip_bpe):
  tokenizer, open_clip = clip_bpe
  texts = [*TEXTS, "  Naïve café &amp; don't\tstop 1234 ", "<start_of_text>hi"]
  np.testing.assert_array_equal(tokenizer.encode(texts), open_clip.tokenize(texts, TINY["context"]).numpy())
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49408, 49406, 49407, 0)


def test_open_clip_embeddings_match(tmp_path_factory, clip_bpe):
  import torch
  model, tmp = tiny_open_clip(), tmp_path_factory.mktemp("open_clip")
  save_safetensors(model, tmp / "model.safetensors")
  out = convert("open_clip", tmp / "model.safetensors", tmp / "out")
  converted = inference.load(out)
  assert converted.config.model.text.act == "gelu" and converted.config.pretrained.preprocess.resize == "shortest"
  images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
  ids = clip_bpe[0].encode(TEXTS)
  with torch.no_grad():
    image_ref = model.encode_image(torch.from_numpy(images), normalize=True).numpy()
    text_ref = model.encode_text(torch.from_numpy(ids).long(), normalize=True).numpy()
  image_diff, text_diff = max_diffs(converted, images, image_ref, ids, text_ref)
  assert image_diff <= TOL and text_diff <= TOL, (image_diff, text_diff)
  np.testing.assert_allclose(np.asarray(converted.params["logit_scale"]), model.logit_scale.item(), rtol=1e-6)


def test_torch_and_safetensors_files_read_alike(tmp_path):
  import torch
  model = tiny_open_clip()
  save_safetensors(model, tmp_path / "m.safetensors")
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "m.pt")
  (from_pt, jit), (from_st, _) = read_state_dict(tmp_path / "m.pt"), read_state_dict(tmp_path / "m.safetensors")
  assert not jit and sorted(from_pt) == sorted(from_st)
  for key in from_st:
    np.testing.assert_array_equal(from_pt[key], from_st[key])
  from safetensors.torch import save_file
  bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  save_file(bf16, str(tmp_path / "bf16.safetensors"))
  from_bf16, _ = read_state_dict(tmp_path / "bf16.safetensors")
  np.testing.assert_array_equal(from_bf16["visual.proj"], model.visual.proj.detach().to(torch.bfloat16).float().numpy())


def test_bad_checkpoints_are_named(tmp_path):
  model = tiny_open_clip()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  from safetensors.torch import save_file
  save_file({k: v for k, v in state.items() if k != "ln_final.weight"}, str(tmp_path / "missing.safetensors"))
  with pytest.raises(ValueError, match="lacks 'ln_final.weight'"):
    convert("open_clip", tmp_path / "missing.safetensors", tmp_path / "out1")
  save_file({**state, "visual.extra.weight": state["ln_final.weight"].clone()}, str(tmp_path / "extra.safetensors"))
  with pytest.raises(ValueError, match="visual.extra.weight"):
    convert("open_clip", tmp_path / "extra.safetensors", tmp_path / "out2")
  save_file(state, str(tmp_path / "ok.safetensors"))
  with pytest.raises(ValueError, match="not a ViT-B-32.*image_size"):
    convert("open_clip", tmp_path / "ok.safetensors", tmp_path / "out3", arch_name="ViT-B-32")
  (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="unknown checkpoint format '.ckpt'"):
    convert("open_clip", tmp_path / "model.ckpt", tmp_path / "out4")
  assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def _hf_towers(**text) -> dict:
  tower = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
  return dict(text_config=dict(tower, max_position_embeddings=TINY["context"], **text),
              vision_config=dict(tower, image_size=32, patch_size=8))


def test_hf_clip_embeddings_match(tmp_path, clip_bpe):
  import torch
  transformers = reference("transformers")
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(**_hf_towers(vocab_size=49408), projection_dim=48)).eval()
  jitter(model)
  model.save_pretrained(tmp_path / "hf")
  converted = inference.load(convert("hf_clip", tmp_path / "hf" / "model.safetensors", tmp_path / "out",
                                     tokenizer=clip_bpe[1].tokenizer.default_bpe()))
  assert converted.config.model.image.act == "quick_gelu" and converted.config.model.joint_dim == 48
  images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  ids = clip_bpe[0].encode(TEXTS)
  with torch.no_grad():
    image_ref = model.get_image_features(pixel_values=torch.from_numpy(images))
    text_ref = model.get_text_features(input_ids=torch.from_numpy(ids).long())
  image_ref, text_ref = (getattr(x, "pooler_output", x) for x in (image_ref, text_ref))
  normalise = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
  image_diff, text_diff = max_diffs(converted, images, normalise(image_ref), ids, normalise(text_ref))
  assert image_diff <= TOL and text_diff <= TOL, (image_diff, text_diff)


def test_hf_siglip_embeddings_match(tmp_path):
  import torch
  transformers = reference("transformers")
  torch.manual_seed(0)
  model = transformers.SiglipModel(transformers.SiglipConfig(**_hf_towers(vocab_size=300))).eval()
  jitter(model)
  model.save_pretrained(tmp_path / "sg")
  import sentencepiece
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"a photo of {w} number {i}" for i, w in enumerate(["cat", "dog", "bird"] * 40)))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sg" / "spiece"),
                                           vocab_size=40, eos_id=1, pad_id=0, unk_id=2, bos_id=-1)
  converted = inference.load(convert("siglip", tmp_path / "sg" / "model.safetensors", tmp_path / "out"))
  assert converted.config.model.image.pool == "map" and converted.config.loss_kind == "siglip"
  ids = tokenizers.from_spec(converted.config.pretrained.tokenizer, tmp_path / "out").encode(TEXTS + ["A cat."])
  hf_tokenizer = transformers.SiglipTokenizer(str(tmp_path / "sg" / "spiece.model"))
  np.testing.assert_array_equal(ids, hf_tokenizer(TEXTS + ["A cat."], padding="max_length", truncation=True,
                                                  max_length=TINY["context"])["input_ids"])
  images = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
  ids = ids[: len(TEXTS)]
  with torch.no_grad():
    image_ref = model.get_image_features(pixel_values=torch.from_numpy(images))
    text_ref = model.get_text_features(input_ids=torch.from_numpy(ids).long())
  image_ref, text_ref = (getattr(x, "pooler_output", x) for x in (image_ref, text_ref))
  normalise = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
  image_diff, text_diff = max_diffs(converted, images, normalise(image_ref), ids, normalise(text_ref))
  assert image_diff <= TOL and text_diff <= TOL, (image_diff, text_diff)
  np.testing.assert_allclose(np.asarray(converted.params["logit_bias"]), model.logit_bias.item(), rtol=1e-6)


def test_vit_b16_loads_on_one_device_and_on_fsdp8(tmp_path):
  open_clip = reference("open_clip")
  save_safetensors(open_clip.create_model("ViT-B-16", pretrained=None), tmp_path / "b16.safetensors")
  out = convert("open_clip", tmp_path / "b16.safetensors", tmp_path / "out", arch_name="ViT-B-16")
  one = inference.load(out)
  assert one.experiment.mesh.size == 1 and one.config.model.image.patch == (16, 16)
  state, _ = read_state_dict(tmp_path / "b16.safetensors")
  np.testing.assert_array_equal(np.asarray(one.params["encoders_text"]["token_embed"]["embedding"]),
                                state["token_embedding.weight"])
  config = inference.read_config(out)
  with config.unlocked():
    config.mesh, config.sharding.layout, config.batch_size = dict(data=1, fsdp=8, tensor=1), "fsdp", 8
  fsdp = Experiment(config)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fsdp.abstract_params,
                          fsdp.param_shardings)
  restore = inference._restore_tree  # pylint: disable=protected-access  (load() takes devices, not a mesh layout)
  sharded = restore((out / inference.PARAMS_DIR).absolute(), abstract)
  fc1 = sharded["encoders_image"]["encoder"]["transformer"]["block_11"]["mlp"]["fc1"]["kernel"]
  assert len(fc1.sharding.device_set) == 8 and fc1.addressable_shards[0].data.size == fc1.size // 8
  flat_one = flax.traverse_util.flatten_dict(one.params, sep="/")
  for key, value in flax.traverse_util.flatten_dict(sharded, sep="/").items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_one[key]), err_msg=key)
