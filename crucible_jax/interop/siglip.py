"""Hugging Face SiglipModel state dicts → crucible's image and text towers."""

import numpy as np

from crucible_jax.interop import layout
from crucible_jax.interop.archs import Arch
from crucible_jax.interop.clip import hf_block
from crucible_jax.interop.layout import Params, Reader, linear, norm


def _map_head(r: Reader, p: str, heads: int) -> Params:
  """SigLIP's MultiheadAttentionPoolingHead → a `map` TokenPool."""
  return {"probe": r(f"{p}.probe").reshape(1, -1), "ln": norm(r, f"{p}.layernorm"),
          "attn": layout.attention(layout.fused_in_proj(r, f"{p}.attention"), r(f"{p}.attention.out_proj.weight"),
                                   r(f"{p}.attention.out_proj.bias"), heads, names=("query", "kv")),
          "mlp": {"fc1": linear(r, f"{p}.mlp.fc1"), "fc2": linear(r, f"{p}.mlp.fc2")}}


def hf_siglip_params(r: Reader, arch: Arch) -> Params:
  """A Hugging Face SiglipModel state dict as crucible params; the image tower's missing projection is identity."""
  v, t = "vision_model", "text_model"
  image = {
      "patch_embed": {"kernel": layout.patch_kernel(r(f"{v}.embeddings.patch_embedding.weight")),
                      "bias": r(f"{v}.embeddings.patch_embedding.bias")},
      "encoder": {"pos_embedding": r(f"{v}.embeddings.position_embedding.weight"),
                  "transformer": layout.transformer(r, hf_block, f"{v}.encoder.layers.{{i}}", arch.image.depth,
                                                    arch.image.heads, f"{v}.post_layernorm")},
  }
  text = {
      "token_embed": {"embedding": r(f"{t}.embeddings.token_embedding.weight")},
      "encoder": {"pos_embedding": r(f"{t}.embeddings.position_embedding.weight"),
                  "transformer": layout.transformer(r, hf_block, f"{t}.encoder.layers.{{i}}", arch.text.depth,
                                                    arch.text.heads, f"{t}.final_layer_norm")},
  }
  return {"encoders_image": image, "encoders_text": text,
          "token_pools_image": _map_head(r, f"{v}.head", arch.image.heads),
          "projections_image": {"proj": {"kernel": np.eye(arch.image.width, dtype=np.float32)}},
          "projections_text": {"proj": linear(r, f"{t}.head")},
          "logit_scale": r("logit_scale").reshape(()), "logit_bias": r("logit_bias").reshape(())}
