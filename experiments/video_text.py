"""MSR-VTT video-text retrieval: a video transformer (8 frames at 224×224, 2×16×16 tubelets) + a 12-layer
byte-level text tower, contrastive, bf16.

Reads `data.root` ($CRUCIBLE_BENCHMARKS_DIR/msrvtt): the official release's train_val_videodatainfo.json and
test_videodatainfo.json ({"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}) and frames
already extracted to frames/{video_id}/*.jpg (no video decoder is installed; see formats/video_text.py for the
ffmpeg line). Trains on the 6,513 train videos × 20 captions and reports retrieval over the full 2,990-video test
split (each video once, each of its 20 captions once) as `test/text_to_video/R@{1,5,10}` and `test/video_to_text/
R@K`. The common 1k-A protocol (1,000 videos, one caption each) is a different list: point `data.splits.test
.annotations` at a file in the same format holding it. HowTo100M pretraining is not part of this run.

`:tiny` — a seconds-long CPU run of the same pipeline (4 frames of 16×16, one-block towers, 3 steps, batch 8).
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
    raise ValueError(f"unknown video_text variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, (video, caption) pairs per step
  c.eval_batch_size = 256  # samples per eval step
  c.data = benchmark_data_config("msrvtt")
  c.data.video_frames = 8  # frames sampled uniformly from each video's extracted frames
  c.data.video_size = (224, 224)  # frame (height, width), pixels
  c.data.text_len = 96  # caption length, byte tokens (longer captions are cut and counted)
  c.data.splits = dict(  # loader args per split
      train=dict(annotations="train_val_videodatainfo.json", split="train"),
      test=dict(annotations="test_videodatainfo.json", split="test"))
  c.data.retrieval_view = True  # eval: each video once, each caption once
  c.data.num_workers = 8  # frame-decoding worker processes
  c.model = default_model_config()
  c.model.modalities = ("text", "video")
  c.model.video.update(frames=8, size=(224, 224), channels=3, tubelet=(2, 16, 16), width=768, depth=12, heads=12,
                       mlp=3072)  # 4×14×14 = 784 tokens
  c.model.text.update(max_len=96, width=768, depth=12, heads=12, mlp=3072)
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
  c.stages = dict(align=dict(steps=10000, lr=5e-4, warmup=500, frozen=(), carry=(),  # ≈20 epochs of 130k pairs
                             objective={"contrastive/video-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("text", "video"), ("video", "text"))))
  c.eval_splits = ("test",)  # → data.splits.test
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 8
    c.data.update(video_frames=4, video_size=(16, 16), text_len=32, num_workers=0)
    c.model.video.update(frames=4, size=(16, 16), tubelet=(2, 8, 8), width=32, depth=1, heads=2, mlp=64)
    c.model.text.update(max_len=32, width=32, depth=1, heads=2, mlp=64)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 1
    c.checkpoint.update(every=0, async_save=False)
    c.stages.align.update(steps=3, warmup=1)
  return c
