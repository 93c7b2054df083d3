"""LibriSpeech: a 12-layer audio transformer (16 kHz, 80 log-mel bins) aligned with a 12-layer byte-level
transcript tower, bf16 — speech↔transcript retrieval, NOT speech recognition.

Reads the extracted OpenSLR `LibriSpeech/` directory at `data.root` ($CRUCIBLE_BENCHMARKS_DIR/librispeech):
{subset}/{speaker}/{chapter}/{speaker}-{chapter}.trans.txt and the .flac files. Trains on train-clean-100 (one
subset per split; the loader does not merge the 960 h) and reports `test_clean/audio_to_text/R@K` and
`test_other/...`.

Limitation: the model's CTC head is digit-only (11 classes: blank + 0-9, `models/crucible.py` DIGIT_CLASSES), and
the `asr` objective and evaluator read DigitWorld's `digits`. Character CTC over transcripts — and with it
`test_clean/asr/wer` — needs a CTC vocabulary field (`model.heads.ctc_vocab`), CTC targets from `text`, and a
character decode in the ASR evaluator. Until then this experiment reports no WER.

`:tiny` — a seconds-long CPU run of the same pipeline (1 s clips, one-block towers, 3 steps, batch 8).
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
    raise ValueError(f"unknown librispeech variant(s) {unknown}; known: {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params and the data order
  c.batch_size = 256  # global batch, utterances per step
  c.eval_batch_size = 256  # utterances per eval step
  c.data = benchmark_data_config("librispeech")
  c.data.sample_rate = 16000  # Hz (LibriSpeech's own rate)
  c.data.audio_seconds = 35.0  # utterance slot, seconds (LibriSpeech utterances are at most ~35 s)
  c.data.text_len = 600  # transcript length, byte tokens (longer transcripts are cut and counted)
  c.data.splits = dict(train=dict(subset="train-clean-100"), test_clean=dict(subset="test-clean"),
                       test_other=dict(subset="test-other"))  # loader args per split
  c.data.num_workers = 8  # FLAC-decoding worker processes
  c.model = default_model_config()
  c.model.modalities = ("text", "audio")
  c.model.audio.update(sample_rate=16000, seconds=35.0, n_fft=400, hop=160, n_mels=80,  # 25 ms / 10 ms frames
                       patch_frames=4, width=768, depth=12, heads=12, mlp=3072)  # 875 tokens of 40 ms
  c.model.text.update(max_len=600, width=768, depth=12, heads=12, mlp=3072)
  c.model.joint_dim = 512  # shared embedding size
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="bfloat16", params="float32")  # bf16 activations/matmuls, f32 master params
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss: clip (softmax InfoNCE) | siglip (sigmoid)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=0.05, clip_norm=1.0, groups={}, lr_scale={})  # AdamW
  c.log_every = 100  # steps between metric rows / progress lines
  c.checkpoint = dict(every=2000, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.plots = False  # the trainer's figures assume DigitWorld batches
  c.stage_order = ("align",)
  c.stages = dict(align=dict(steps=10000, lr=3e-4, warmup=500, frozen=(), carry=(),  # ≈90 epochs of 28.5k utts
                             objective={"contrastive/audio-text": 1.0}))
  c.evals = dict(retrieval=dict(pairs=(("audio", "text"), ("text", "audio"))))
  c.eval_splits = ("test_clean", "test_other")  # → data.splits.test_clean / test_other
  if "tiny" in variants:
    c.batch_size = c.eval_batch_size = 8
    c.data.update(audio_seconds=1.0, text_len=32, num_workers=0)
    c.data.splits = dict(train=dict(subset="train-clean-100"), test_clean=dict(subset="test-clean"))
    c.eval_splits = ("test_clean",)
    c.model.audio.update(seconds=1.0, n_mels=32, width=32, depth=1, heads=2, mlp=64)
    c.model.text.update(max_len=32, width=32, depth=1, heads=2, mlp=64)
    c.model.joint_dim = 32
    c.precision.compute = "float32"
    c.log_every = 1
    c.checkpoint.update(every=0, async_save=False)
    c.stages.align.update(steps=3, warmup=1)
  return c
