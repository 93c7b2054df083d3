"""The one table of pretrained two-tower architectures (open_clip's names) and their dims as read off a checkpoint."""

import dataclasses

SOURCES = ("open_clip", "hf_clip", "siglip")  # `crucible convert --from`
HEAD_WIDTH = 64  # open_clip's head_width: heads = width // 64 in every ViT and text tower it ships
QUICKGELU_SUFFIX = "-quickgelu"


@dataclasses.dataclass(frozen=True)
class Tower:
  """One Transformer tower's size."""

  width: int
  depth: int
  heads: int
  mlp: int


@dataclasses.dataclass(frozen=True)
class Arch:
  """A CLIP-style model: image ViT, text Transformer, joint space."""

  image: Tower
  text: Tower
  image_size: int  # square input, pixels
  patch: int  # square patch, pixels
  context: int  # text positions
  vocab: int  # text token ids
  embed_dim: int  # joint space
  act: str = "gelu"  # MLP activation (models.layers.ACTIVATIONS)


def _vit(width: int, depth: int) -> Tower:
  return Tower(width, depth, width // HEAD_WIDTH, 4 * width)


ARCHS: dict[str, Arch] = {
    "ViT-B-32": Arch(_vit(768, 12), _vit(512, 12), 224, 32, 77, 49408, 512),
    "ViT-B-16": Arch(_vit(768, 12), _vit(512, 12), 224, 16, 77, 49408, 512),
    "ViT-L-14": Arch(_vit(1024, 24), _vit(768, 12), 224, 14, 77, 49408, 768),
}


def arch_named(name: str) -> Arch:
  """ARCHS[name]; a `-quickgelu` suffix (open_clip's name for OpenAI-trained weights) selects QuickGELU."""
  base = name.removesuffix(QUICKGELU_SUFFIX)
  if base not in ARCHS:
    known = ", ".join(f"{n}[{QUICKGELU_SUFFIX}]" for n in ARCHS)
    raise ValueError(f"--arch {name!r} is not a known architecture; known: {known}")
  arch = ARCHS[base]
  return dataclasses.replace(arch, act="quick_gelu") if name.endswith(QUICKGELU_SUFFIX) else arch


def check_matches(name: str, expected: Arch, found: Arch) -> None:
  """ValueError listing every dim where the checkpoint (`found`) differs from `--arch name` (`expected`)."""
  diffs = [f"{f.name}: {name} has {getattr(expected, f.name)}, the checkpoint {getattr(found, f.name)}"
           for f in dataclasses.fields(Arch) if f.name != "act" and getattr(expected, f.name) != getattr(found, f.name)]
  if diffs:
    raise ValueError(f"the checkpoint is not a {name}: " + "; ".join(diffs))
