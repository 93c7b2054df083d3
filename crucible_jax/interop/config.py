"""The experiment config a converted checkpoint carries: its towers, preprocessing and tokenizer, ready to fine-tune."""

from typing import Any

import ml_collections

from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.interop.archs import Arch
from crucible_jax.models import default_model_config

# open_clip's OPENAI_DATASET_MEAN/STD (CLIP's preprocessing) and SigLIP's [-1, 1] scaling.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_TOWERS = (  # open_clip / HF CLIP: class token + ln_pre, no patch or projection bias, EOT pooling, causal text
    dict(norm_eps=1e-5, fast_variance=False, pool="cls", cls_token=True, pre_norm=True, patch_bias=False,
         proj_bias=False),
    dict(norm_eps=1e-5, fast_variance=False, pool="eot", mask="causal", proj_bias=False),
)
SIGLIP_TOWERS = (  # SigLIP: MAP-head image pooling (no projection), last-token text pooling through a biased head
    dict(norm_eps=1e-6, fast_variance=False, pool="map", proj_bias=False),
    dict(norm_eps=1e-6, fast_variance=False, pool="last", mask="none", proj_bias=True),
)


def converted_config(arch: Arch, towers: tuple[dict, dict], preprocess: dict[str, Any], tokenizer: dict[str, Any],
                     source: str, arch_name: str | None) -> ml_collections.ConfigDict:
  """An image-text experiment config for `arch` with embedding heads only and a contrastive fine-tuning stage."""
  image_opts, text_opts = towers
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 8
  c.data = default_data_config()
  c.data.name = "pretrained"  # no dataset: `crucible train` needs data.* set to a real one to fine-tune
  c.data.image_size = (arch.image_size, arch.image_size)
  c.data.channels = 3
  c.data.text_len = arch.context
  c.data.question_len = min(c.data.question_len, arch.context)
  c.model = m = default_model_config()
  m.modalities = ("image", "text")
  m.joint_dim = arch.embed_dim
  m.heads.enabled = ("embed",)
  m.fusion.question_len = c.data.question_len
  m.image.update(size=(arch.image_size, arch.image_size), channels=3, patch=(arch.patch, arch.patch),
                 width=arch.image.width, depth=arch.image.depth, heads=arch.image.heads, mlp=arch.image.mlp,
                 act=arch.act, **image_opts)
  m.text.update(vocab_size=arch.vocab, max_len=arch.context, width=arch.text.width, depth=arch.text.depth,
                heads=arch.text.heads, mlp=arch.text.mlp, act=arch.act, **text_opts)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding = dict(layout="dp")
  c.precision = dict(compute="float32", params="float32")
  c.compression = dict(method="none", rank=4)
  c.loss_kind = "siglip" if text_opts["pool"] == "last" else "clip"
  c.nan_policy = "skip"
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=1e-4, clip_norm=1.0, groups={}, lr_scale={})
  c.log_every = 50
  c.checkpoint = dict(every=500, keep=2, async_save=True)
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=1000, lr=1e-5, warmup=100, frozen=(), carry=(),
                             objective={"contrastive/image-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("image", "text"), ("text", "image"))))
  c.eval_splits = ("test",)
  c.pretrained = dict(source=source, arch=arch_name or "", preprocess=preprocess, tokenizer=tokenizer)
  return c
