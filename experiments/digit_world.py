"""DigitWorld, all four modalities, three stages: the default experiment.

`--config experiments/digit_world.py[:VARIANTS]`, VARIANTS a comma list of: tiny (the seconds-long test run),
corrupted / imbalanced (data variants), single_stage (the ablation), no_cross_attention (the ablation).
"""

import ml_collections

from crucible_jax.data.pipeline import default_data_config
from crucible_jax.models import default_model_config
from crucible_jax.train.stages import as_single_stage

VARIANTS = ("tiny", "corrupted", "imbalanced", "single_stage", "no_cross_attention")
PAIRS = (("image", "text"), ("text", "image"), ("audio", "image"), ("image", "audio"), ("video", "text"),
         ("text", "video"), ("audio", "text"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default DigitWorld run; see the module docstring for variants."""
  variants = tuple(v for v in (arg or "").split(",") if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown digit_world variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params, dropout/routing noise and the data order
  c.batch_size = 64  # global batch, examples per step
  c.eval_batch_size = 256  # examples per eval step
  c.data = default_data_config()
  c.model = default_model_config()
  for family in ("image", "video", "audio", "text"):
    c.model[family].update(width=64, depth=2, heads=4, mlp=128)  # encoder width/depth/heads/MLP width
  c.model.joint_dim = 64  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="float32", params="float32")  # compute dtype; params stay f32
  c.compression = dict(method="none", rank=4)  # data-parallel gradient reduction: none|bf16|int8|powersgd
  c.loss_kind = "clip"  # contrastive loss: clip (softmax InfoNCE) | siglip (sigmoid)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=1e-4, clip_norm=1.0,  # AdamW moments, decay, global-norm clip
                 groups={}, lr_scale={})  # param-path regex per group; LR multiplier per group
  c.log_every = 50  # steps between metric rows / progress lines
  c.checkpoint = dict(every=500, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  encoders = r"_encoder|Encoder"
  c.stage_order = ("unimodal", "align", "joint")
  c.stages = dict(
      unimodal=dict(steps=600, lr=2e-3, warmup=60, frozen=(), carry=(),  # steps, peak LR, warmup steps
                    objective={f"pretrain/{m}": 1.0 for m in ("image", "text", "audio", "video")}),
      align=dict(steps=400, lr=1e-3, warmup=40, frozen=(), carry=(encoders,),
                 objective={"contrastive/image-text": 1.0, "contrastive/audio-image": 1.0,
                            "contrastive/video-text": 1.0, "contrastive/audio-text": 0.5}),
      joint=dict(steps=600, lr=1e-3, warmup=60, frozen=(), carry=(".*",),
                 objective={"vqa": 1.0, "tagging": 1.0, "asr": 1.0, "fused": 1.0,
                            "contrastive/image-text": 0.5, "contrastive/audio-image": 0.5,
                            "contrastive/video-text": 0.5}),
  )
  c.evals = dict(retrieval=dict(pairs=PAIRS), vqa={}, tagging={}, asr={}, fused={})
  c.eval_splits = ("test", "test_heldout_speaker")  # splits evaluated at the end → results.json
  if "tiny" in variants:
    _make_tiny(c)
  if "corrupted" in variants:
    c.data.variant = "corrupted"
  if "imbalanced" in variants:
    c.data.variant = "imbalanced"
  if "no_cross_attention" in variants:
    c.model.fusion.cross_attention = False
  if "single_stage" in variants:
    as_single_stage(c)
  return c


def _make_tiny(c: ml_collections.ConfigDict) -> None:
  """Seconds-long run for tests: tiny data, widths and step counts."""
  c.data.update(train_size=512, val_size=64, test_size=128, heldout_size=64)
  c.batch_size = 32
  c.eval_batch_size = 64
  for family in ("image", "video", "audio", "text"):
    c.model[family].update(width=32, depth=1, heads=2, mlp=64)
  c.model.joint_dim = 32
  c.log_every = 10
  c.checkpoint.every = 20
  for name, steps in (("unimodal", 30), ("align", 30), ("joint", 30)):
    c.stages[name].update(steps=steps, warmup=5)
