"""Your own collection: contrastive image–text(–audio–video) training on whatever modalities the data has.

  crucible train --config experiments/own_data.py:tiny --config.data.manifest=PATH.jsonl --workdir W
  crucible train --config experiments/own_data.py --config.data.shards='DIR/*.tar' --workdir W

The manifest (JSONL/CSV) or the shards are read once at config load to find the modalities (`resolve`); the model
gets an encoder for each, one `align` stage trains a contrastive term for each pair with text (and audio–image),
and `test` — `data.eval_fraction` of the records (default 0.1), or `data.eval_manifest` — scores retrieval in both
directions: results.json has `test/image_to_text/R@1`, `test/text_to_image/R@1`, `test/audio_to_text/R@1`, ...
Layouts: crucible_jax/data/own/records.py. Model input shapes follow `data.*` (image_size, text_len, ...).

Default: ViT-S/16-sized towers at 224x224, 5 s of 16 kHz audio, batch 256, 10k steps, bf16 (a GPU run).
`:tiny` — a CPU test run: 32x32 images, one-block towers, 1 s of 8 kHz audio, 40 steps, batch 16.

Fine-tuning a pretrained CLIP: `--config.init_from=DIR` (a `crucible convert` output) takes its towers, tokenizer
and preprocessing; `--config.stages.align.lora="{'towers': ('image', 'text'), 'rank': 8, 'alpha': 16}"` trains
LoRA adapters only (README, "Fine-tune a pretrained CLIP").
"""

import pathlib

import ml_collections

from crucible_jax.common_types import AUDIO, IMAGE, TEXT, VIDEO
from crucible_jax.data.own.config import detect_modalities, own_data_config
from crucible_jax.interop.config import adopt_pretrained
from crucible_jax.train.checkpoint import PARAMS_DIR
from crucible_jax.models import default_model_config
from crucible_jax.parallel.compression import default_compression_config

VARIANTS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default-size run; `tiny` shrinks it for CPU tests."""
  variants = tuple(v for v in (arg or "").split(",") if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown own_data variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, records per step
  c.eval_batch_size = 256  # records per eval step
  c.data = own_data_config()
  c.data.update(image_size=(224, 224), video_size=(112, 112), video_frames=8, sample_rate=16000,
                audio_seconds=5.0, text_len=64, num_workers=8)
  c.model = default_model_config()
  c.model.modalities = ()  # () = the modalities the data has (resolve)
  for family in ("image", "video", "audio", "text"):
    c.model[family].update(width=384, depth=6, heads=6, mlp=1536)  # encoder width/depth/heads/MLP width
  c.model.image.patch = (16, 16)  # ViT patch, pixels
  c.model.video.tubelet = (2, 16, 16)  # (frames, height, width) per video token
  c.model.audio.update(n_fft=400, hop=160, n_mels=64, patch_frames=8)  # 25 ms windows, 10 ms hop, 64 mels
  c.model.joint_dim = 256  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="bfloat16", params="float32")  # bf16 activations/matmuls, f32 master params
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss: clip (softmax InfoNCE) | siglip (sigmoid)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=0.1, clip_norm=1.0, groups={}, lr_scale={})  # AdamW
  c.log_every = 100  # steps between metric rows / progress lines
  c.checkpoint = dict(every=1000, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.plots = False  # the trainer's figures assume DigitWorld batches
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=10000, lr=5e-4, warmup=500, frozen=(), carry=(),
                             accum_steps=1,  # GradCache chunks per step (the contrastive loss still sees the batch)
                             lora={},  # {} = off; {'towers': ('image', 'text'), 'rank': 8, 'alpha': 16}: adapters
                             objective={}))  # {} = a contrastive term per pair the data has (resolve)
  c.evals = dict(retrieval=dict(pairs=()))  # () = both directions of each trained pair (resolve)
  c.eval_splits = ("test",)
  c.init_from = ""  # a converted checkpoint (crucible convert) or workdir; a checkpoint's towers, tokenizer and
  # preprocessing replace model.* and data.{image_size,image_mean,image_std,text_len,tokenizer} (resolve)
  c.init_from_take = ()  # regexes of the param paths to take; () = all
  c.init_from_partial = False  # False: any key that does not fit stops the run; True: load what fits, report the rest
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 16
    c.data.update(image_size=(32, 32), video_size=(16, 16), video_frames=2, sample_rate=8000, audio_seconds=1.0,
                  text_len=32, num_workers=0)
    for family in ("image", "video", "audio", "text"):
      c.model[family].update(width=32, depth=1, heads=2, mlp=64)
    c.model.image.patch = (8, 8)
    c.model.video.tubelet = (2, 8, 8)
    c.model.audio.update(n_fft=256, hop=128, n_mels=32, patch_frames=4)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 10
    c.checkpoint.update(every=0, async_save=False)
    c.stages.align.update(steps=40, lr=2e-3, warmup=5)
  return c


def resolve(config: ml_collections.ConfigDict) -> None:
  """After --config overrides: a converted `init_from`'s model and inputs, the data's modalities, their contrastive
  pairs, and model input shapes = data's."""
  if config.init_from and pathlib.Path(config.init_from, PARAMS_DIR).is_dir():
    adopt_pretrained(config, config.init_from)
  if not config.model.modalities:
    found = detect_modalities(config.data)
    if TEXT not in found or len(found) < 2:
      raise ValueError(f"own data: contrastive training needs text and another modality; the data has {found}")
    config.model.modalities = found
  active = tuple(config.model.modalities)
  pairs = [(m, TEXT) for m in (IMAGE, AUDIO, VIDEO) if m in active and TEXT in active]
  if AUDIO in active and IMAGE in active:
    pairs.append((AUDIO, IMAGE))
  if not config.stages.align.objective:
    config.stages.align.objective = {f"contrastive/{a}-{b}": 1.0 for a, b in pairs}
  if not config.evals.retrieval.pairs:
    config.evals.retrieval.pairs = tuple(p for a, b in pairs for p in ((a, b), (b, a)))
  d, m = config.data, config.model
  m.image.update(size=tuple(d.image_size), channels=d.channels)
  m.video.update(size=tuple(d.video_size), frames=d.video_frames, channels=d.channels)
  m.audio.update(sample_rate=d.sample_rate, seconds=d.audio_seconds)
  m.text.max_len = d.text_len
