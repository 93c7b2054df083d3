"""MSCOCO image-text retrieval: a CLIP two-tower (ViT-B/16 at 224×224 + a 12-layer byte-level text tower), bf16.

Reads COCO 2017 from `data.root` ($CRUCIBLE_BENCHMARKS_DIR/coco): annotations/captions_{train,val}2017.json and the
train2017/, val2017/ JPEGs. Trains contrastive alignment on every (image, caption) pair of train2017 (captions of
one image are all positives), then scores retrieval on val2017 — 5,000 images against their 25,000 captions, each
listed once (`data.retrieval_view`) — as `test/image_to_text/R@{1,5,10}` and `test/text_to_image/R@K`. val2017 is
not the Karpathy 5k test split (that split is a list outside the official layout). Trained from scratch on COCO
alone: published 82% R@1 comes from models pretrained on 100M+ pairs; this run does not claim it.

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
    raise ValueError(f"unknown coco_retrieval variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, (image, caption) pairs per step
  c.eval_batch_size = 512  # samples per eval step
  c.data = benchmark_data_config("coco")
  c.data.image_size = (224, 224)  # pixels (height, width); images are resized, not cropped
  c.data.text_len = 128  # caption length, byte tokens (longer captions are cut and counted)
  c.data.splits = dict(train=dict(split="train2017"), test=dict(split="val2017"))  # loader args per split
  c.data.retrieval_view = True  # eval: each image once, each caption once (the 5k-image protocol)
  c.data.num_workers = 8  # JPEG-decoding worker processes
  c.model = default_model_config()
  c.model.modalities = ("image", "text")
  c.model.image.update(size=(224, 224), channels=3, patch=(16, 16), width=768, depth=12, heads=12, mlp=3072)
  c.model.text.update(max_len=128, width=768, depth=12, heads=12, mlp=3072)
  c.model.joint_dim = 512  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="bfloat16", params="float32")  # bf16 activations/matmuls, f32 master params
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss: clip (softmax InfoNCE) | siglip (sigmoid)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=0.2, clip_norm=1.0, groups={}, lr_scale={})  # AdamW
  c.log_every = 100  # steps between metric rows / progress lines
  c.checkpoint = dict(every=2000, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.plots = False  # the trainer's figures assume DigitWorld batches
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=23000, lr=5e-4, warmup=1000, frozen=(), carry=(),  # ≈10 epochs of 591k pairs
                             objective={"contrastive/image-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("image", "text"), ("text", "image"))))
  c.eval_splits = ("test",)  # → data.splits.test (val2017)
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 8
    c.data.update(image_size=(32, 32), text_len=32, num_workers=0)
    c.model.image.update(size=(32, 32), width=32, depth=1, heads=2, mlp=64)
    c.model.text.update(max_len=32, width=32, depth=1, heads=2, mlp=64)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 1
    c.checkpoint.update(every=0, async_save=False)
    c.stages.align.update(steps=3, warmup=1)
  return c
