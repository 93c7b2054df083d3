"""DigitWorld, all four modalities, three stages: the default experiment.

`--config experiments/digit_world.py[:VARIANTS]`, VARIANTS a comma list of: tiny (the test run: 90 steps, ~1.5 min
on 2 CPU cores, most of it compiling), corrupted / imbalanced (data variants), single_stage (the ablation),
no_cross_attention (the ablation), routed (the dynamic modality router on, every modality at 60% of the batch,
routing losses in every stage), generate (a 4th stage training the caption and image decoders on the frozen aligned
encoders).
"""

import ml_collections

from crucible_jax.data.digit_world.config import default_data_config
from crucible_jax.models import default_model_config
from crucible_jax.parallel.compression import default_compression_config
from crucible_jax.train.curriculum import default_curriculum_config
from crucible_jax.train.stages import as_single_stage

VARIANTS = ("tiny", "corrupted", "imbalanced", "single_stage", "no_cross_attention", "routed", "generate", "voices",
            "augment")
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
  c.batch_size = 32  # global batch, examples per step (sized so the default run fits 10 min on 2 CPU cores)
  c.eval_batch_size = 256  # examples per eval step
  c.data = default_data_config()
  c.data.extra_questions = 7  # 8 VQA questions per image in training: the answer head needs the examples
  c.model = default_model_config()
  for family in ("image", "video", "audio", "text"):
    c.model[family].update(width=64, depth=2, heads=4, mlp=128)  # encoder width/depth/heads/MLP width
  c.model.image.update(stem=(32, 64), patch=(4, 4))  # conv stem 16x64 -> 4x16 grid; one token per 16x16 digit box
  c.model.image.stem_convs = 2  # two 3x3 convs per stem stage: whole strings read at 0.89-0.94 (one conv: 0.84)
  c.model.video.update(stem=(32, 64), tubelet=(2, 4, 4))  # per-frame stem 16x16 -> 4x4; a token per 2 frames
  for family in ("image", "video"):  # positions as loud as the stem's features: the read-out finds digit k at once
    c.model[family].pos_std = 0.5
  c.model.joint_dim = 64  # shared embedding size
  c.model.heads.vqa_hidden = 256  # the answer head's MLP: sums, parities and look-ups over the digit slots
  c.model.heads.vqa_reader = "slots"  # answer from a sum of per-slot messages (Deep Sets), not the flattened slots
  c.model.fusion.gated = False  # no tanh gate: the VQA cross-attention is new in `joint` and needs full strength
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh sizes; -1 fills the remaining devices
  c.sharding = dict(layout="dp")  # logical axis rules: dp | fsdp | fsdp_tp
  c.precision = dict(compute="float32", params="float32")  # compute dtype; params stay f32
  c.compression = default_compression_config()
  c.loss_kind = "clip"  # contrastive loss: clip (softmax InfoNCE) | siglip (sigmoid)
  c.nan_policy = "skip"  # non-finite loss/grad: skip the update (counted) | abort
  c.optim = dict(b1=0.9, b2=0.98, weight_decay=1e-4, clip_norm=1.0,  # AdamW moments, decay, global-norm clip
                 groups={"vqa_head": r"^vqa_head"},  # param-path regex per group: the VQA answer head...
                 lr_scale={"vqa_head": 3.0},  # ...at 3x each stage's LR (it has joint's 500 steps to learn sums)
                 schedules={}, skip_below={})  # per-group schedule overrides; per-group grad-norm skip threshold
  c.curriculum = default_curriculum_config()  # sample weighting by difficulty (off by default)
  c.loss_scale = dict(initial_scale=2.0**15, period=2000)  # float16 dynamic loss scaling (unused otherwise)
  c.xla = dict(overlap_comm=False)  # GPU: latency-hiding scheduler + collective combining flags
  c.log_every = 50  # steps between metric rows / progress lines
  c.checkpoint = dict(every=500, keep=2, async_save=True)  # steps between saves; checkpoints kept; async writes
  c.init_from = ""  # params directory (crucible convert) or workdir to start from; "" = random init
  c.init_from_take = ()  # regexes of the param paths to take (e.g. "^encoders_image/"); () = all
  c.init_from_partial = False  # False: any key that does not fit stops the run; True: load what fits, report the rest
  encoders = r"^(encoders|pools)_"  # param paths of the encoders and their order-aware read-outs
  reading = {f"pretrain/{m}": 0.5 for m in ("image", "text", "audio", "video")}  # keeps the slots digit-aligned
  c.stage_order = ("unimodal", "align", "joint")
  c.stages = dict(
      unimodal=dict(steps=700, lr=3e-3, warmup=50, frozen=(), carry=(),  # steps, peak LR, warmup steps
                    objective={f"pretrain/{m}": 1.0 for m in ("image", "text", "audio", "video")}),
      align=dict(steps=200, lr=1e-3, warmup=20, frozen=(), carry=(encoders,),
                 objective={"contrastive/image-text": 1.0, "contrastive/audio-image": 1.0,
                            "contrastive/video-text": 1.0, "contrastive/audio-text": 0.5, **reading}),
      joint=dict(steps=500, lr=1e-3, warmup=30, frozen=(), carry=(".*",),
                 objective={"vqa": 1.0, "tagging": 1.0, "asr": 1.0, "fused": 1.0,
                            "contrastive/image-text": 0.5, "contrastive/audio-image": 0.5,
                            "contrastive/video-text": 0.5, **reading}),
  )
  c.evals = dict(retrieval=dict(pairs=PAIRS), vqa={}, tagging={}, asr={}, fused={})
  c.eval_splits = ("test", "test_heldout_speaker")  # splits evaluated at the end → results.json
  if "voices" in variants:
    c.data.synthetic_voices = 64  # eSpeak NG voices (en/es/fr/cmn, variants, pitch, rate, intonation)
    c.data.synthetic_share = 0.75  # of train samples; the two real training voices speak the rest
  if "augment" in variants:
    c.model.audio.augment.enabled = True  # speed, noise, gain and SpecAugment on device, in training only
  if "tiny" in variants:
    _make_tiny(c)
  if "corrupted" in variants:
    c.data.variant = "corrupted"
  if "imbalanced" in variants:
    c.data.variant = "imbalanced"
  if "no_cross_attention" in variants:
    c.model.fusion.cross_attention = False
  if "routed" in variants:
    _make_routed(c)
  if "generate" in variants:
    _make_generate(c, tiny="tiny" in variants)
  if "single_stage" in variants:
    as_single_stage(c)
  return c


def _make_tiny(c: ml_collections.ConfigDict) -> None:
  """The run for tests: tiny data, widths and step counts (its time is mostly XLA compiling)."""
  c.data.update(train_size=512, val_size=64, test_size=128, heldout_size=64)
  c.batch_size = 32
  c.eval_batch_size = 64
  for family in ("image", "video", "audio", "text"):
    c.model[family].update(width=32, depth=1, heads=2, mlp=64)
  c.model.image.update(stem=(8,), patch=(4, 4))
  c.model.video.update(stem=(8,), tubelet=(2, 4, 4))
  c.model.joint_dim = 32
  c.log_every = 10
  c.checkpoint.every = 20
  for name, steps in (("unimodal", 30), ("align", 30), ("joint", 30)):
    c.stages[name].update(steps=steps, warmup=5)


def _make_generate(c: ml_collections.ConfigDict, tiny: bool) -> None:
  """Stage 4 `generate`: only the converter's decoders learn (everything else frozen), from the joint params."""
  conv = c.model.converter
  conv.enabled = True
  conv.image_target = "reference"  # prompts fix the digits, not the hand: draw them in the reference hand
  c.data.caption_len = conv.max_len  # each sample carries its canonical caption ("three seven one"), tokens
  c.stage_order = (*c.stage_order, "generate")
  c.stages.generate = dict(
      steps=30 if tiny else 600, lr=2e-3, warmup=5 if tiny else 50,  # steps, peak LR, warmup steps
      frozen=(r"^(?!(caption|image)_decoder)",), carry=(".*",),  # train the decoders only
      objective={**{f"caption/{m}": 1.0 for m in conv.caption_sources},
                 **{f"imagine/{m}": 1.0 for m in conv.image_sources}})
  c.evals.caption = dict(sources=tuple(conv.caption_sources))  # exact-string accuracy and WER per source
  c.evals.image_generation = dict(sources=("text", "audio"),  # recogniser accuracy of generated images
                                  recognizer_steps=100 if tiny else 1500)  # recogniser training steps


def _make_routed(c: ml_collections.ConfigDict, fraction: float = 0.6) -> None:
  """Router on: each encoder sees `fraction` of the batch; budget/balance/utility losses join every routed stage.

  Unimodal pretraining bypasses the router's plan (`route=False`): it trains each encoder alone, and routing there
  would only starve the encoders of samples (measured: the ablation table's routed run read at 0.36 joint accuracy
  when every stage was routed). The estimator learns there too (`routing/utility`), from every sample.
  """
  c.model.routing.enabled = True
  c.model.routing.budget.update({m: fraction for m in c.model.modalities})
  # The estimator starts from scratch and must learn to tell intact from corrupted inputs in few steps (measured:
  # at the shared LR it routed 40% of the corrupted images of `corrupted` at budget 0.5, at 10x 14%).
  c.optim.groups["router"] = r"^router/"
  c.optim.lr_scale["router"] = 10.0
  for name in c.stage_order:
    if name == "unimodal":
      c.stages[name].route = False  # bypass the router's plan: every encoder sees the whole batch...
      c.stages[name].objective["routing/utility"] = 1.0  # ...and the estimator a utility target for every sample
    else:
      # The estimator keeps what it learned before (one alternation, so the pattern still matches with routing off).
      c.stages[name].carry = tuple(p if p == ".*" else f"{p}|^router/" for p in c.stages[name].carry)
      # The utility term reads each modality's pretrain head; its pretrain term keeps that head current.
      c.stages[name].objective.update({"routing/budget": 1.0, "routing/balance": 0.1, "routing/utility": 1.0,
                                       **{f"pretrain/{m}": 0.5 for m in c.model.modalities}})  # loss weights
  c.routing_bench = dict(  # `crucible bench routing` knobs (see crucible_jax/bench/routing.py)
      budgets=(1.0, 0.75, 0.5, 0.35),  # per-modality batch fractions measured against routing off
      variants=("clean", "corrupted"),  # DigitWorld variants, one trained run each
      split="test", timing_iters=5,  # evaluated split; timed forward calls (best of)
      tolerance=0.01,  # largest joint-metric drop (fraction) still counted as "within 1 point"
      workdir="/tmp/crucible_bench_routing")  # trained runs (reused when present), JSON copy, usage PNG
