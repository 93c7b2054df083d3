"""Model config → `CrucibleModel`: every field validated first (ValueError naming the key), then the specs built."""

from typing import Any

import jax.numpy as jnp
import ml_collections

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, present_key
from crucible_jax.models import balance as balance_lib
from crucible_jax.models import converter as converter_lib
from crucible_jax.models.crucible import (ALL_HEADS, DTYPES, VQA_READERS, CrucibleModel, FusionSpec, ModelConfig,
                                         TowerSpec)
from crucible_jax.models.encoders import TEXT_MASKS
from crucible_jax.models.heads import POOLS
from crucible_jax.models.layers import ACTIVATIONS, ATTENTION_KERNELS, Dtype, Style
from crucible_jax.models.lora import LoRA, lora_of
from crucible_jax.models.melspec import audio_augment_spec, num_frames
from crucible_jax.models.router import routing_spec


def _get(cfg: ml_collections.ConfigDict, path: str) -> Any:
  """cfg at a dotted path, or ValueError naming the missing key."""
  node = cfg
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ValueError(f"model config lacks {path!r}")
    node = node[part]
  return node


def _dtype(cfg: ml_collections.ConfigDict, path: str) -> Dtype:
  name = _get(cfg, path)
  if name not in DTYPES:
    raise ValueError(f"{path}={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def _positive(cfg: ml_collections.ConfigDict, path: str) -> int:
  value = _get(cfg, path)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{path}={value!r} must be a positive integer")
  return value


def _choice(cfg: ml_collections.ConfigDict, path: str, choices: tuple[str, ...]) -> str:
  value = _get(cfg, path)
  if value not in choices:
    raise ValueError(f"{path}={value!r}: expected one of {choices}")
  return value


def _divides(cfg: ml_collections.ConfigDict, sizes: tuple[str, ...], parts: str,
             stem_stride: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """The `parts` tuple, after checking it divides the sizes at the `sizes` paths (x the stem's stride) elementwise."""
  size = sum((tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in map(lambda k: _get(cfg, k), sizes)), ())
  part = tuple(_get(cfg, parts))
  stride = stem_stride or (1,) * len(part)
  if len(size) != len(part) or any(p <= 0 or s % (p * r) for s, p, r in zip(size, part, stride)):
    stem = f" times the conv stem's pooling {stride}" if stem_stride else ""
    raise ValueError(f"{' x '.join(sizes)}={size} is not divisible by {parts}={part}{stem}")
  return part


def _tower(cfg: ml_collections.ConfigDict, m: str) -> TowerSpec:
  width, heads = _positive(cfg, f"{m}.width"), _positive(cfg, f"{m}.heads")
  if width % heads:
    raise ValueError(f"{m}.width={width} is not divisible by {m}.heads={heads}")
  dtype = _dtype(cfg, f"{m}.dtype") if "dtype" in cfg[m] else _dtype(cfg, "dtype")
  stem = tuple(cfg[m].get("stem", ()))
  if m == TEXT and stem:
    raise ValueError(f"text.stem={stem}: only image, video and audio encoders take a conv stem")
  if any(isinstance(f, bool) or not isinstance(f, int) or f <= 0 for f in stem):
    raise ValueError(f"{m}.stem={stem} must be a tuple of positive channel counts")
  stem_convs = _positive(cfg, f"{m}.stem_convs") if "stem_convs" in cfg[m] else 1
  pos_std = cfg[m].get("pos_std", 0.02)
  if isinstance(pos_std, bool) or not isinstance(pos_std, (int, float)) or pos_std <= 0:
    raise ValueError(f"{m}.pos_std={pos_std!r} must be a positive number")
  attention = _choice(cfg, "attention", ATTENTION_KERNELS) if "attention" in cfg else "xla"
  if attention == "cudnn" and dtype == jnp.float32:
    raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype; {m} computes in float32")
  return TowerSpec(width, _positive(cfg, f"{m}.depth"), heads, _positive(cfg, f"{m}.mlp"), dtype, stem=stem,
                   stem_convs=stem_convs, pos_std=float(pos_std), attention=attention, lora=_lora(cfg, m),
                   **_pretrained_options(cfg, m))


def _lora(cfg: ml_collections.ConfigDict, m: str) -> LoRA | None:
  """`{m}.lora` = {rank, alpha} (set from the stages' `lora` by `train.setup`), or None."""
  spec = cfg[m].get("lora")
  return lora_of(spec, f"{m}.lora") if spec else None


def _flag(cfg: ml_collections.ConfigDict, path: str, default: bool) -> bool:
  """A bool field that older configs may lack."""
  m, key = path.split(".")
  value = cfg[m].get(key, default)
  if not isinstance(value, bool):
    raise ValueError(f"{path}={value!r} must be true or false")
  return value


def _pretrained_options(cfg: ml_collections.ConfigDict, m: str) -> dict[str, Any]:
  """The tower options pretrained CLIP/SigLIP towers need (TowerSpec's defaults when a config lacks them)."""
  node = cfg[m]
  opts = {k: node.get(k, d) for k, d in (("act", "gelu_tanh"), ("pool", "slots"), ("mask", "padding"))}
  for key, choices in (("act", tuple(ACTIVATIONS)), ("pool", POOLS), ("mask", TEXT_MASKS)):
    if opts[key] not in choices:
      raise ValueError(f"{m}.{key}={opts[key]!r}: expected one of {choices}")
  if m != TEXT and opts["pool"] in ("eot", "last") or m == TEXT and opts["pool"] == "cls":
    raise ValueError(f"{m}.pool={opts['pool']!r} does not apply to {m} tokens")
  if m != TEXT and opts["mask"] != "padding":
    raise ValueError(f"{m}.mask={opts['mask']!r}: only the text tower takes a mask option")
  eps = node.get("norm_eps", 1e-6)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
    raise ValueError(f"{m}.norm_eps={eps!r} must be a number in (0, 1)")
  flags = {k: _flag(cfg, f"{m}.{k}", d) for k, d in (
      ("fast_variance", True), ("pre_norm", False), ("cls_token", False), ("patch_bias", True), ("proj_bias", True))}
  if m == TEXT and (flags["pre_norm"] or flags["cls_token"]):
    raise ValueError("text.pre_norm and text.cls_token apply to patch towers only")
  if opts["pool"] == "cls" and not flags["cls_token"]:
    raise ValueError(f"{m}.pool='cls' needs {m}.cls_token=True")
  return dict(style=Style(opts["act"], float(eps), flags["fast_variance"]), pre_norm=flags["pre_norm"],
              cls_token=flags["cls_token"], patch_bias=flags["patch_bias"], pool=opts["pool"],
              proj_bias=flags["proj_bias"], text_mask=opts["mask"])


def _num_labels(cfg: ml_collections.ConfigDict) -> int:
  """heads.num_labels; configs saved before the field existed (checkpoints, converted params dirs) had 10."""
  return _positive(cfg, "heads.num_labels") if "num_labels" in _get(cfg, "heads") else 10


def build_model(cfg: ml_collections.ConfigDict) -> CrucibleModel:
  """Validate `cfg` (ValueError naming the key) and build the model."""
  modalities = tuple(_get(cfg, "modalities"))
  if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
    raise ValueError(f"modalities={modalities}: expected distinct names from {MODALITIES}")
  modalities = tuple(m for m in MODALITIES if m in modalities)
  towers = tuple((m, _tower(cfg, m)) for m in modalities)
  heads = _get(cfg, "heads").get("enabled", None)
  if heads is not None and (not heads or not set(heads) <= set(ALL_HEADS)):
    raise ValueError(f"heads.enabled={heads!r}: expected None (all) or a subset of {ALL_HEADS}")
  heads = None if heads is None else tuple(heads)
  widths = {f"{m}.width": t.width for m, t in towers}
  if len(set(widths.values())) > 1 and (heads is None or {"fused", "vqa"} & set(heads)):
    raise ValueError(f"adaptive fusion and VQA need one width for all active modalities, got {widths} "
                     f"(heads.enabled=('embed',) drops them)")
  patch, tubelet = (1, 1), (1, 1, 1)
  stride = {m: 2 ** len(t.stem) for m, t in towers}  # each conv stem stage halves height and width
  if IMAGE in modalities:
    patch = _divides(cfg, ("image.size",), "image.patch", (stride[IMAGE],) * 2)
  if VIDEO in modalities:
    tubelet = _divides(cfg, ("video.frames", "video.size"), "video.tubelet", (1,) + (stride[VIDEO],) * 2)
  frontend = ()
  if AUDIO in modalities:
    keys = ("sample_rate", "n_fft", "hop", "n_mels", "patch_frames")
    frontend = tuple((k, _positive(cfg, f"audio.{k}")) for k in keys)
    a = dict(frontend)
    if a["n_fft"] < a["hop"]:
      raise ValueError(f"audio.n_fft={a['n_fft']} must be at least audio.hop={a['hop']}")
    frames = num_frames(int(_get(cfg, "audio.seconds") * a["sample_rate"]), a["hop"]) // stride[AUDIO]
    if frames < a["patch_frames"]:
      raise ValueError(f"audio.seconds={cfg.audio.seconds} gives {frames} frames (after the conv stem's pooling), "
                       f"fewer than audio.patch_frames")
    if a["n_mels"] < stride[AUDIO]:
      raise ValueError(f"audio.n_mels={a['n_mels']} is smaller than the conv stem's pooling {stride[AUDIO]}")
  text_vocab = (0, 0)
  if TEXT in modalities:
    text_vocab = (_positive(cfg, "text.vocab_size"), _positive(cfg, "text.max_len"))
    if _positive(cfg, "fusion.question_len") > text_vocab[1]:
      raise ValueError(f"fusion.question_len={cfg.fusion.question_len} exceeds text.max_len={text_vocab[1]}")
  fusion_dtype = _dtype(cfg, "fusion.dtype") if "dtype" in _get(cfg, "fusion") else _dtype(cfg, "dtype")
  fusion = FusionSpec(
      bool(_get(cfg, "fusion.cross_attention")), bool(_get(cfg, "fusion.gated")), _positive(cfg, "fusion.cross_depth"),
      fusion_dtype,
  )
  return CrucibleModel(ModelConfig(
      modalities=modalities, towers=towers, image_patch=tuple(patch), video_tubelet=tuple(tubelet),
      audio_frontend=frontend, text_vocab=text_vocab, fusion=fusion, joint_dim=_positive(cfg, "joint_dim"),
      max_digits=_positive(cfg, "heads.max_digits"), num_labels=_num_labels(cfg),
      num_answers=_positive(cfg, "heads.num_answers"),
      vqa_hidden=_positive(cfg, "heads.vqa_hidden"), vqa_reader=_choice(cfg, "heads.vqa_reader", VQA_READERS),
      num_tags=_positive(cfg, "heads.num_tags"),
      dtype=_dtype(cfg, "dtype"), param_dtype=_dtype(cfg, "param_dtype"),
      routing=routing_spec(cfg.get("routing"), modalities),
      balance=balance_lib.balance_spec(cfg.get("balance")),
      audio_augment=audio_augment_spec(cfg.audio.get("augment")) if AUDIO in modalities else None,
      converter=converter_lib.converter_spec(cfg.get("converter"), modalities, tuple(_get(cfg, "image.size")),
                                             _get(cfg, "image.channels")),
      heads=heads,
  ))


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int = 2) -> dict[str, jnp.ndarray]:
  """Zero inputs of the right shapes for the active modalities (to init the model or trace a step)."""
  modalities, b = tuple(cfg.modalities), batch_size
  batch = {present_key(m): jnp.ones((b,), bool) for m in modalities}
  if IMAGE in modalities:
    batch[IMAGE] = jnp.zeros((b, *cfg.image.size, cfg.image.channels), jnp.float32)
  if VIDEO in modalities:
    batch[VIDEO] = jnp.zeros((b, cfg.video.frames, *cfg.video.size, cfg.video.channels), jnp.float32)
  if AUDIO in modalities:
    samples = int(cfg.audio.seconds * cfg.audio.sample_rate)
    batch[AUDIO], batch["audio_len"] = jnp.zeros((b, samples), jnp.float32), jnp.full((b,), samples, jnp.int32)
  if TEXT in modalities:
    batch[TEXT] = jnp.ones((b, cfg.text.max_len), jnp.int32)
    batch["question"] = jnp.ones((b, cfg.fusion.question_len), jnp.int32)
  return batch
