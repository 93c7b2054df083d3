"""VQA v2: ViT-B/16 image tower (224×224) + a 12-layer byte-level question tower fused by cross-attention, bf16.

Reads the official layout from `data.root` ($CRUCIBLE_BENCHMARKS_DIR/vqa_v2): v2_OpenEnded_mscoco_{split}_questions
.json, v2_mscoco_{split}_annotations.json and the COCO 2014 images in {split}/. The answer vocabulary is the 3,129
most frequent train2014 answers; train questions outside it are dropped, val questions are kept (scored against
their human answers). Reports the official soft accuracy over the 10 human answers on val2014 as `val/vqa/accuracy`
and per answer type (`val/vqa/accuracy_{0,1,2}` = yes/no, number, other). test-dev is scored only by the EvalAI
server, so it is not reported here. Trained from scratch on VQA v2 alone (no image-text pretraining).

`:tiny` — a seconds-long CPU run of the same pipeline (32×32 images, one-block towers, 3 steps, batch 8).
"""

import ml_collections

from crucible_jax.data.benchmarks import benchmark_data_config
from crucible_jax.models import default_model_config
from crucible_jax.parallel.compression import default_compression_config

VARIANTS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The realistic run; `tiny` shrinks it for CPU smoke tests."""
  variants = tuple(v for v in (arg or "").split(",") if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown vqa_v2 variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, questions per step
  c.eval_batch_size = 512  # questions per eval step
  c.data = benchmark_data_config("vqa_v2")
  c.data.image_size = (224, 224)  # pixels (height, width); images are resized, not cropped
  c.data.text_len = 64  # caption slot, byte tokens (unused by VQA; must equal model.text.max_len)
  c.data.question_len = 64  # question length, byte tokens
  c.data.answer_vocab_size = 3129  # closed answer vocabulary: the most frequent train answers
  c.data.num_human_answers = 10  # human answers per question kept for soft accuracy
  c.data.splits = dict(train=dict(split="train2014", unknown_answer="skip"),  # loader args per split
                       val=dict(split="val2014", unknown_answer="keep"))
  c.data.num_workers = 8  # JPEG-decoding worker processes
  c.model = default_model_config()
  c.model.modalities = ("image", "text")
  c.model.image.update(size=(224, 224), channels=3, patch=(16, 16), width=768, depth=12, heads=12, mlp=3072)
  c.model.text.update(max_len=64, width=768, depth=12, heads=12, mlp=3072)
  c.model.fusion.update(cross_attention=True, cross_depth=2, question_len=64)  # question↔image cross-attention
  c.model.heads.num_answers = 3129  # = data.answer_vocab_size
  c.model.joint_dim = 512  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="bfloat16", params="float32")  # bf16 activations/matmuls, f32 master params
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss kind (no contrastive term here)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=0.05, clip_norm=1.0, groups={}, lr_scale={})  # AdamW
  c.log_every = 100  # steps between metric rows / progress lines
  c.checkpoint = dict(every=2000, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.plots = False  # the trainer's figures assume DigitWorld batches (its question types)
  c.stage_order = ("joint",)
  c.stages = dict(joint=dict(steps=17000, lr=1e-4, warmup=1000, frozen=(), carry=(),  # ≈10 epochs of 443k questions
                             objective={"vqa": 1.0}))
  c.evals = dict(vqa={})
  c.eval_splits = ("val",)  # → data.splits.val (val2014)
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 8
    c.data.update(image_size=(32, 32), text_len=32, question_len=32, num_workers=0)
    c.model.image.update(size=(32, 32), width=32, depth=1, heads=2, mlp=64)
    c.model.text.update(max_len=32, width=32, depth=1, heads=2, mlp=64)
    c.model.fusion.update(cross_depth=1, question_len=32)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 1
    c.checkpoint.update(every=0, async_save=False)
    c.stages.joint.update(steps=3, warmup=1)
  return c
