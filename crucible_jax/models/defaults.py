"""The model's default config: every field `build_model` reads, tiny enough to compile in seconds on a CPU."""

import ml_collections

from crucible_jax.data.tokenizers import byte
from crucible_jax.models import balance as balance_lib
from crucible_jax.models import converter as converter_lib


def pretrained_tower_fields(tower: ml_collections.ConfigDict, patches: bool = True) -> None:
  """The options converted CLIP/SigLIP towers set; these defaults are crucible's own towers."""
  tower.act = "gelu_tanh"  # MLP activation: gelu_tanh | gelu (erf) | quick_gelu (OpenAI CLIP)
  tower.norm_eps = 1e-6  # LayerNorm epsilon (torch models: 1e-5)
  tower.fast_variance = True  # LayerNorm variance as E[x²]-E[x]² (Flax); False: two-pass, as torch
  tower.pool = "slots"  # read-out into the joint space: slots | cls | map | mean | eot | last (models.heads.POOLS)
  tower.proj_bias = True  # bias of the joint-space projection
  if patches:
    tower.pre_norm = False  # LayerNorm after the positional embedding (CLIP's ln_pre)
    tower.cls_token = False  # learned class token before the patches (CLIP)
    tower.patch_bias = True  # bias of the patch embedding
  else:
    tower.mask = "padding"  # attention mask: padding (id 0 hidden) | causal (CLIP) | none (SigLIP)


def default_model_config() -> ml_collections.ConfigDict:
  """Tiny defaults that compile in seconds on a CPU; experiments override fields."""
  cfg = ml_collections.ConfigDict()
  cfg.modalities = ("image", "text", "audio", "video")  # active modalities, a subset of MODALITIES
  cfg.joint_dim = 32  # width of the shared cross-modal embedding space (features)
  cfg.dtype = "float32"  # compute dtype of heads and of encoders without their own `dtype` ("float32"/"bfloat16")
  cfg.param_dtype = "float32"  # storage dtype of every param
  cfg.attention = "xla"  # encoders' attention kernel: xla (einsums, any backend) | cudnn (fused, NVIDIA GPU, bf16/f16)

  cfg.image = image = ml_collections.ConfigDict()
  image.size = (16, 64)  # (height, width) of input images, pixels
  image.channels = 1  # colour channels
  image.patch = (4, 4)  # (height, width) of one ViT patch, pixels
  image.width, image.depth, image.heads, image.mlp = 32, 1, 2, 64  # features, blocks, heads, MLP features
  image.stem = ()  # conv stem channels, a 3x3 conv each before patchifying; () = plain linear patches
  image.stem_convs = 1  # 3x3 conv + gelu layers per stem stage, before its 2x2 max-pool
  image.pos_std = 0.02  # init std of the learned positional embedding (token features are ~unit scale)
  pretrained_tower_fields(image)

  cfg.video = video = ml_collections.ConfigDict()
  video.frames = 8  # frames per clip
  video.size = (16, 16)  # (height, width) of a frame, pixels
  video.channels = 1  # colour channels
  video.tubelet = (2, 4, 4)  # (frames, height, width) of one tubelet token
  video.width, video.depth, video.heads, video.mlp = 32, 1, 2, 64  # features, blocks, heads, MLP features
  video.stem = ()  # conv stem channels, a 3x3 conv each before patchifying; () = plain linear patches
  video.stem_convs = 1  # 3x3 conv + gelu layers per stem stage, before its 2x2 max-pool
  video.pos_std = 0.02  # init std of the learned positional embedding (token features are ~unit scale)
  pretrained_tower_fields(video)

  cfg.audio = audio = ml_collections.ConfigDict()
  audio.sample_rate = 8000  # waveform samples per second, Hz
  audio.seconds = 4.0  # padded clip length, seconds
  audio.n_fft = 512  # STFT window, samples
  audio.hop = 160  # STFT hop, samples (one log-mel frame per hop)
  audio.n_mels = 32  # mel bins
  audio.patch_frames = 4  # log-mel frames per audio token
  audio.width, audio.depth, audio.heads, audio.mlp = 32, 1, 2, 64  # features, blocks, heads, MLP features
  audio.stem = ()  # conv stem channels, a 3x3 conv each before patchifying; () = plain linear patches
  audio.stem_convs = 1  # 3x3 conv + gelu layers per stem stage, before its 2x2 max-pool
  audio.pos_std = 0.02  # init std of the learned positional embedding (token features are ~unit scale)
  pretrained_tower_fields(audio)
  audio.augment = augment = ml_collections.ConfigDict()  # train-time augmentation on device (eval never augments)
  augment.enabled = False  # master switch; the fields below apply only when True
  augment.speed = (0.9, 1.1)  # speed perturbation: resampling factor range (> 1 faster, higher)
  augment.snr_db = (10.0, 40.0)  # additive white noise, SNR range in dB of the speech; None = no noise
  augment.gain_db = (-6.0, 6.0)  # loudness change range, dB
  augment.time_masks = 2  # SpecAugment time masks per utterance
  augment.time_mask_frames = 10  # widest time mask, log-mel frames (hop-long each)
  augment.freq_masks = 2  # SpecAugment frequency masks per utterance
  augment.freq_mask_bins = 4  # widest frequency mask, mel bins

  cfg.text = text = ml_collections.ConfigDict()
  text.vocab_size = byte.VOCAB_SIZE  # token ids, 0 = padding; raised to data.tokenizer's when a config loads
  text.max_len = 48  # longest caption or question, tokens
  text.width, text.depth, text.heads, text.mlp = 32, 1, 2, 64  # features, blocks, heads, MLP features
  text.pos_std = 0.02  # init std of the learned positional embedding (token embeddings start at std 0.02 too)
  pretrained_tower_fields(text, patches=False)

  cfg.fusion = fusion = ml_collections.ConfigDict()
  fusion.cross_attention = True  # VQA fuses question and image by cross-attention (False: concatenation ablation)
  fusion.gated = True  # Flamingo tanh-gated residuals (identity at init)
  fusion.cross_depth = 1  # bidirectional cross-attention blocks
  fusion.question_len = 32  # VQA question length, tokens

  cfg.heads = heads = ml_collections.ConfigDict()
  heads.max_digits = 4  # longest label sequence (positions predicted by pretrain/fused heads; DigitWorld: digits)
  heads.num_labels = 10  # label classes of the position heads and the CTC head (DigitWorld: the digits 0-9)
  heads.num_answers = 48  # closed VQA answer vocabulary
  heads.vqa_hidden = 64  # hidden units of the VQA answer head's MLP (it combines question and image slots)
  heads.vqa_reader = "concat"  # answer head input: concat (question + flattened slots) | slots (sum over slots)
  heads.num_tags = 10  # audio tagging labels (which digits are spoken)
  heads.enabled = None  # heads the model has, a subset of ALL_HEADS (converted CLIP: ("embed",)); None = all

  cfg.routing = routing = ml_collections.ConfigDict()
  routing.enabled = False  # dynamic modality router: encode each modality only on its budgeted share of the batch
  routing.budget = dict(image=1.0, text=1.0, audio=1.0, video=1.0)  # fraction of the batch encoded per modality
  routing.temperature = 1.0  # softness of the straight-through sigmoid gate (score units)
  routing.min_modalities = 1  # modalities every sample keeps, capacity allowing (count)
  routing.groups = 1  # batch blocks routed independently (count); Experiment sets it to the data-shard count

  cfg.balance = balance_lib.default_balance_config()  # modality-imbalance gradient balancing (OGM-GE), off by default
  cfg.converter = converter_lib.default_converter_config()  # cross-modal generation decoders, off by default
  return cfg
