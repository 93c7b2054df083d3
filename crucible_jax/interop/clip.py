"""open_clip / OpenAI CLIP and Hugging Face CLIPModel state dicts → crucible's image and text towers."""

import dataclasses
import math
from typing import Any

import numpy as np

from crucible_jax.interop import layout
from crucible_jax.interop.archs import HEAD_WIDTH, Arch, Tower, arch_named, check_matches
from crucible_jax.interop.layout import Params, Reader, linear, norm
from crucible_jax.models.crucible import LOGIT_BIAS_INIT

HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _open_clip_block(r: Reader, p: str, heads: int) -> Params:
  return {"ln_attn": norm(r, f"{p}.ln_1"), "ln_mlp": norm(r, f"{p}.ln_2"),
          "attn": layout.attention(layout.fused_in_proj(r, f"{p}.attn"), r(f"{p}.attn.out_proj.weight"),
                                   r(f"{p}.attn.out_proj.bias"), heads),
          "mlp": {"fc1": linear(r, f"{p}.mlp.c_fc"), "fc2": linear(r, f"{p}.mlp.c_proj")}}


def hf_block(r: Reader, p: str, heads: int) -> Params:
  """A Hugging Face CLIP/SigLIP encoder layer (separate q/k/v projections)."""
  qkv = [(r(f"{p}.self_attn.{n}_proj.weight"), r(f"{p}.self_attn.{n}_proj.bias")) for n in "qkv"]
  return {"ln_attn": norm(r, f"{p}.layer_norm1"), "ln_mlp": norm(r, f"{p}.layer_norm2"),
          "attn": layout.attention(qkv, r(f"{p}.self_attn.out_proj.weight"), r(f"{p}.self_attn.out_proj.bias"), heads),
          "mlp": {"fc1": linear(r, f"{p}.mlp.fc1"), "fc2": linear(r, f"{p}.mlp.fc2")}}


def _heads_of(width: int, what: str) -> int:
  if width % HEAD_WIDTH:
    raise ValueError(f"{what} width {width} is not a multiple of {HEAD_WIDTH}: pass --arch to give its heads")
  return width // HEAD_WIDTH


def open_clip_arch(r: Reader, name: str | None, torchscript: bool) -> Arch:
  """The checkpoint's dims (heads = width / 64, as open_clip builds them), checked against `--arch name`."""
  conv, pos, tokens = r("visual.conv1.weight"), r("visual.positional_embedding"), r("token_embedding.weight")
  mlp = "transformer.resblocks.0.mlp.c_fc.weight"
  image = Tower(conv.shape[0], r.count("visual.transformer.resblocks.{i}.ln_1.weight"), 0, r(f"visual.{mlp}").shape[0])
  text = Tower(tokens.shape[1], r.count("transformer.resblocks.{i}.ln_1.weight"), 0, r(mlp).shape[0])
  patch = conv.shape[-1]
  found = Arch(image, text, math.isqrt(pos.shape[0] - 1) * patch, patch, r("positional_embedding").shape[0],
               tokens.shape[0], r("text_projection").shape[1], act="quick_gelu" if torchscript else "gelu")
  if name:
    expected = arch_named(name)
    check_matches(name, expected, dataclasses.replace(
        found, image=dataclasses.replace(image, heads=expected.image.heads),
        text=dataclasses.replace(text, heads=expected.text.heads)))
    return dataclasses.replace(expected, act="quick_gelu") if torchscript else expected
  return dataclasses.replace(found, image=dataclasses.replace(image, heads=_heads_of(image.width, "image")),
                             text=dataclasses.replace(text, heads=_heads_of(text.width, "text")))


def open_clip_params(r: Reader, arch: Arch) -> Params:
  """An open_clip CLIP (or OpenAI CLIP) state dict as crucible params."""
  image = {
      "patch_embed": {"kernel": layout.patch_kernel(r("visual.conv1.weight"))},
      "cls_token": r("visual.class_embedding"),
      "encoder": {"pos_embedding": r("visual.positional_embedding"), "ln_pre": norm(r, "visual.ln_pre"),
                  "transformer": layout.transformer(r, _open_clip_block, "visual.transformer.resblocks.{i}",
                                                    arch.image.depth, arch.image.heads, "visual.ln_post")},
  }
  text = {
      "token_embed": {"embedding": r("token_embedding.weight")},
      "encoder": {"pos_embedding": r("positional_embedding"),
                  "transformer": layout.transformer(r, _open_clip_block, "transformer.resblocks.{i}",
                                                    arch.text.depth, arch.text.heads, "ln_final")},
  }
  return _two_towers(image, text, r("visual.proj"), r("text_projection"), r("logit_scale"))


def _two_towers(image: Params, text: Params, image_proj: Any, text_proj: Any, logit_scale: Any) -> Params:
  return {"encoders_image": image, "encoders_text": text,
          "projections_image": {"proj": {"kernel": image_proj}}, "projections_text": {"proj": {"kernel": text_proj}},
          "logit_scale": logit_scale.reshape(()), "logit_bias": np.asarray(LOGIT_BIAS_INIT, np.float32)}


def hf_arch(config: dict[str, Any]) -> tuple[Arch, float]:
  """(Arch, LayerNorm eps) of a Hugging Face CLIP/SigLIP config.json."""
  try:
    v, t = config["vision_config"], config["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    tower = lambda c: Tower(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                            c["intermediate_size"])
    embed = config.get("projection_dim") or t.get("projection_size") or v["hidden_size"]
    arch = Arch(tower(v), tower(t), v["image_size"], v["patch_size"], t["max_position_embeddings"], t["vocab_size"],
                embed, act=HF_ACTS.get(acts.pop(), "unknown") if len(acts) == 1 else "mixed")
  except KeyError as e:
    raise ValueError(f"config.json lacks {e} (not a Hugging Face CLIP/SigLIP config)") from e
  if arch.act not in HF_ACTS.values() or len(eps) != 1:
    raise ValueError(f"config.json: hidden_act {acts} / layer_norm_eps {eps} must be one supported value for both "
                     f"towers ({sorted(HF_ACTS)})")
  return arch, eps.pop()


def hf_clip_params(r: Reader, arch: Arch) -> Params:
  """A Hugging Face CLIPModel state dict as crucible params."""
  v, t = "vision_model", "text_model"
  image = {
      "patch_embed": {"kernel": layout.patch_kernel(r(f"{v}.embeddings.patch_embedding.weight"))},
      "cls_token": r(f"{v}.embeddings.class_embedding"),
      "encoder": {"pos_embedding": r(f"{v}.embeddings.position_embedding.weight"),
                  "ln_pre": norm(r, f"{v}.pre_layrnorm"),
                  "transformer": layout.transformer(r, hf_block, f"{v}.encoder.layers.{{i}}", arch.image.depth,
                                                    arch.image.heads, f"{v}.post_layernorm")},
  }
  text = {
      "token_embed": {"embedding": r(f"{t}.embeddings.token_embedding.weight")},
      "encoder": {"pos_embedding": r(f"{t}.embeddings.position_embedding.weight"),
                  "transformer": layout.transformer(r, hf_block, f"{t}.encoder.layers.{{i}}", arch.text.depth,
                                                    arch.text.heads, f"{t}.final_layer_norm")},
  }
  return _two_towers(image, text, r("visual_projection.weight").T, r("text_projection.weight").T, r("logit_scale"))
