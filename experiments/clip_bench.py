"""The step-benchmark workload: a two-tower image-text CLIP (ViT 64×64/8 + text transformer), float32.

`:vit_b16` is the GPU variant: ViT-B/16 at 224×224 with a 12-layer text tower, bf16 compute.
"""

import ml_collections

from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.models import default_model_config
from crucible_jax.parallel.compression import default_compression_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CPU workload by default; `vit_b16` for accelerators."""
  if arg not in (None, "vit_b16"):
    raise ValueError(f"unknown clip_bench variant {arg!r}; known: vit_b16")
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init seed
  c.batch_size = 64  # global batch, examples per step
  c.bench_steps = 10  # timed steps (best-of)
  c.bench_profile_dir = ""  # if set, a jax.profiler trace of 3 more steps lands here (TensorBoard/XProf format)
  c.data = default_data_config()
  c.data.image_size = (64, 64)  # pixels
  c.data.channels = 3  # RGB
  c.data.text_len = 32  # tokens
  c.model = default_model_config()
  c.model.modalities = ("image", "text")
  c.model.image.update(size=(64, 64), channels=3, patch=(8, 8), width=256, depth=6, heads=4, mlp=1024)
  c.model.text.update(vocab_size=1000, max_len=32, width=256, depth=6, heads=4, mlp=1024)
  c.model.joint_dim = 256  # shared embedding size
  c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device: the benchmark measures one chip against its own peak
  c.sharding = dict(layout="dp")
  c.precision = dict(compute="float32", params="float32")
  c.compression = default_compression_config()
  c.loss_kind = "clip"
  c.nan_policy = "skip"
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=1e-4, clip_norm=1.0, groups={}, lr_scale={})
  c.log_every = 0
  c.checkpoint = dict(every=0, keep=1, async_save=True)
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=100, lr=1e-3, warmup=10, frozen=(), carry=(),
                             objective={"contrastive/image-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("image", "text"), ("text", "image"))))
  c.eval_splits = ("test",)
  if arg == "vit_b16":
    c.batch_size = 256
    c.data.image_size = (224, 224)
    c.data.text_len = 64
    c.model.image.update(size=(224, 224), patch=(16, 16), width=768, depth=12, heads=12, mlp=3072)
    c.model.text.update(vocab_size=32000, max_len=64, width=768, depth=12, heads=12, mlp=3072)
    c.model.joint_dim = 512
    c.precision = dict(compute="bfloat16", params="float32")
    c.model.attention = "cudnn"  # fused flash attention: the [B, 12, 196, 196] logits never reach HBM
  return c
