"""The experiment config a converted checkpoint carries: its towers, preprocessing and tokenizer, ready to fine-tune."""

import pathlib
from typing import Any

import ml_collections

from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.inference import read_config
from crucible_jax.interop.archs import Arch
from crucible_jax.models import default_model_config
from crucible_jax.parallel.compression import default_compression_config

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
  c.compression = default_compression_config()
  c.loss_kind = "siglip" if text_opts["pool"] == "last" else "clip"
  c.nan_policy = "skip"
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=1e-4, clip_norm=1.0, groups={}, lr_scale={})
  c.log_every = 50
  c.checkpoint = dict(every=500, keep=2, async_save=True)
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=1000, lr=1e-5, warmup=100, frozen=(), carry=(), accum_steps=1, lora={},
                             objective={"contrastive/image-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("image", "text"), ("text", "image"))))
  c.eval_splits = ("test",)
  c.pretrained = dict(source=source, arch=arch_name or "", preprocess=preprocess, tokenizer=tokenizer)
  return c


def adopt_pretrained(config: ml_collections.ConfigDict, params_dir: str | pathlib.Path) -> None:
  """Fit a dataset's experiment config to the converted checkpoint in `params_dir`: its towers (`model`), contrastive
  loss, tokenizer (`data.tokenizer`, read from the checkpoint's file) and preprocessing (image size, mean and std;
  the data's own crops), and `pretrained`, so `crucible embed --workdir` preprocesses as the checkpoint does.
  ValueError naming what does not fit."""
  params_dir = pathlib.Path(params_dir).absolute()
  saved = read_config(params_dir)
  if "pretrained" not in saved:
    raise ValueError(f"init_from={str(params_dir)!r} is not a converted checkpoint (its config has no `pretrained`)")
  pretrained = saved.pretrained.to_dict()
  tokenizer = dict(pretrained["tokenizer"], file=str(params_dir / pretrained["tokenizer"]["file"]))
  if tokenizer["kind"] != "clip_bpe":
    raise ValueError(f"init_from={str(params_dir)!r}: fine-tuning on your data reads CLIP BPE tokenizers; this "
                     f"checkpoint's is {tokenizer['kind']!r}")
  preprocess = pretrained["preprocess"]
  config.model = ml_collections.ConfigDict(saved.model.to_dict())
  config.loss_kind = saved.loss_kind
  d = config.data
  d.image_size, d.channels = (preprocess["size"], preprocess["size"]), 3
  d.image_mean, d.image_std = tuple(preprocess["mean"]), tuple(preprocess["std"])
  d.text_len = tokenizer["max_len"]
  d.tokenizer.kind, d.tokenizer.path = "clip_bpe", tokenizer["file"]
  config.pretrained = ml_collections.ConfigDict(dict(pretrained, tokenizer=tokenizer))
