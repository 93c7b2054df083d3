"""Names shared by every layer: logical axes, modalities, batch keys.

Models speak only logical axis names; `parallel.rules` maps them to mesh axes in one table.
"""

from typing import Final

# Logical axis names (MaxText `common_types` style). Params and activations are annotated with these.
BATCH: Final = "batch"  # examples in a batch
LENGTH: Final = "length"  # tokens / patches / frames along a sequence
EMBED: Final = "embed"  # model width of an encoder
MLP: Final = "mlp"  # hidden width of an MLP
HEADS: Final = "heads"  # attention heads
KV: Final = "kv"  # per-head feature size
VOCAB: Final = "vocab"  # token vocabulary
PATCH: Final = "patch"  # flattened input patch (pixels, mel bins x frames)
JOINT: Final = "joint"  # width of the shared cross-modal embedding space
CLASSES: Final = "classes"  # task-head output classes
NORM: Final = "norm"  # scale/bias of normalisation layers (never sharded)
LORA_RANK: Final = "lora_rank"  # rank of a LoRA adapter (never sharded)

# Modalities, in a fixed order used by fusion weights and routing plans.
IMAGE: Final = "image"
TEXT: Final = "text"
AUDIO: Final = "audio"
VIDEO: Final = "video"
MODALITIES: Final = (IMAGE, TEXT, AUDIO, VIDEO)


def present_key(modality: str) -> str:
  """Batch key of the bool[B] flag saying a sample carries `modality`."""
  return f"{modality}_present"
