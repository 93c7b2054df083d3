"""AudioSet tagging: a 12-layer audio transformer on 10 s of 16 kHz log-mel (128 bins), 527 labels, bf16.

Reads `data.root` ($CRUCIBLE_BENCHMARKS_DIR/audioset): the official CSVs (balanced_train_segments.csv,
eval_segments.csv, class_labels_indices.csv) and locally stored audio in audio/ (segment files
{YTID}_{start:.3f}.wav|.flac or whole-video files cut to the segment). Segments whose audio is not there (videos
taken down) are skipped and counted (`data.skip_bad_records`). Trains the tagging head with sigmoid BCE over the 527
labels on the balanced train set (~22k clips) and reports `test/tagging/mAP`: macro mean average precision over
the classes with a positive in eval_segments.csv. (mAP is the standard AudioSet metric; MBT reaches 52.3 on
AS-500K. A 68.1% claim cannot be an mAP.) No mixup, SpecAugment or ImageNet pretraining.

`:tiny` — a seconds-long CPU run of the same pipeline (1 s clips, a one-block tower, 3 steps, batch 8).
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
    raise ValueError(f"unknown audioset variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, clips per step
  c.eval_batch_size = 512  # clips per eval step
  c.data = benchmark_data_config("audioset")
  c.data.sample_rate = 16000  # Hz; audio is resampled to it
  c.data.audio_seconds = 10.0  # clip length, seconds (AudioSet segments are 10 s)
  c.data.num_labels = 527  # classes in class_labels_indices.csv
  c.data.skip_bad_records = True  # unavailable videos are normal in AudioSet: skip and count them
  c.data.splits = dict(train=dict(csv="balanced_train_segments.csv"),  # loader args per split
                       test=dict(csv="eval_segments.csv"))
  c.data.num_workers = 8  # audio-decoding worker processes
  c.model = default_model_config()
  c.model.modalities = ("audio",)
  c.model.audio.update(sample_rate=16000, seconds=10.0, n_fft=400, hop=160, n_mels=128,  # 25 ms / 10 ms frames
                       patch_frames=4, width=768, depth=12, heads=12, mlp=3072)  # 250 tokens of 40 ms
  c.model.heads.num_tags = 527  # = data.num_labels
  c.model.joint_dim = 512  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="bfloat16", params="float32")  # bf16 activations/matmuls, f32 master params
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss kind (no contrastive term here)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=0.05, clip_norm=1.0, groups={}, lr_scale={})  # AdamW
  c.log_every = 50  # steps between metric rows / progress lines
  c.checkpoint = dict(every=1000, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.plots = False  # the trainer's figures assume DigitWorld batches
  c.stage_order = ("joint",)
  c.stages = dict(joint=dict(steps=5000, lr=2e-4, warmup=500, frozen=(), carry=(),  # ≈58 epochs of 22k clips
                             objective={"tagging": 1.0}))
  c.evals = dict(tagging={})
  c.eval_splits = ("test",)  # → data.splits.test (eval_segments.csv)
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 8
    c.data.update(audio_seconds=1.0, num_workers=0)
    c.model.audio.update(seconds=1.0, n_mels=32, width=32, depth=1, heads=2, mlp=64)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 1
    c.checkpoint.update(every=0, async_save=False)
    c.stages.joint.update(steps=3, warmup=1)
  return c
