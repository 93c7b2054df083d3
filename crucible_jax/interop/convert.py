"""A pretrained checkpoint → a params directory (`inference.save_params_dir`) with its preprocessing and tokenizer."""

import importlib.util
import json
import pathlib
import shutil
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from crucible_jax.config import validate
from crucible_jax.inference import save_params_dir
from crucible_jax.interop import clip, siglip, tokenizers
from crucible_jax.interop.archs import SOURCES, Arch
from crucible_jax.interop.checkpoints import read_state_dict
from crucible_jax.interop.config import CLIP_MEAN, CLIP_STD, CLIP_TOWERS, SIGLIP_MEAN, SIGLIP_STD, SIGLIP_TOWERS
from crucible_jax.interop.config import converted_config
from crucible_jax.interop.layout import Reader
from crucible_jax.parallel import mesh as mesh_lib
from crucible_jax.train.setup import Experiment

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = {  # looked for beside the checkpoint, in this order
    "open_clip": ("bpe_simple_vocab_16e6.txt.gz", "merges.txt"),
    "hf_clip": ("merges.txt", "bpe_simple_vocab_16e6.txt.gz"),
    "siglip": ("spiece.model", "tokenizer.model"),
}


def _tokenizer_file(source: str, checkpoint: pathlib.Path, given: str | None) -> pathlib.Path:
  """--tokenizer, else a known file beside the checkpoint, else (CLIP) the vocabulary the open_clip package ships."""
  if given:
    if not pathlib.Path(given).is_file():
      raise FileNotFoundError(f"--tokenizer file not found: {given}")
    return pathlib.Path(given)
  for name in TOKENIZER_FILES[source]:
    if (checkpoint.parent / name).is_file():
      return checkpoint.parent / name
  spec = importlib.util.find_spec("open_clip") if source != "siglip" else None
  if spec is not None and spec.submodule_search_locations:
    shipped = pathlib.Path(spec.submodule_search_locations[0]) / TOKENIZER_FILES["open_clip"][0]
    if shipped.is_file():
      return shipped
  raise FileNotFoundError(f"no tokenizer file beside {checkpoint} (looked for {', '.join(TOKENIZER_FILES[source])});"
                          f" pass --tokenizer FILE")


def _hf_config(checkpoint: pathlib.Path, given: str | None) -> dict[str, Any]:
  path = pathlib.Path(given) if given else checkpoint.parent / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint needs its config.json (--hf-config FILE)")
  return json.loads(path.read_text())


def _check_tree(params: dict, abstract: Any, source: str) -> None:
  """The converted tree must be the model's: same keys, same shapes."""
  got = flax.traverse_util.flatten_dict(params, sep="/")
  want = flax.traverse_util.flatten_dict(abstract, sep="/")
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  shapes = sorted(f"{k}: {np.shape(got[k])} vs {tuple(want[k].shape)}" for k in set(want) & set(got)
                  if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or unexpected or shapes:
    raise ValueError(f"the {source} conversion does not fit the model: missing {missing[:8]}, unexpected "
                     f"{unexpected[:8]}, shape-mismatched {shapes[:8]}")


def convert(source: str, checkpoint: str | pathlib.Path, out: str | pathlib.Path, arch_name: str | None = None,
            tokenizer: str | None = None, hf_config: str | None = None) -> pathlib.Path:
  """Read `checkpoint` (a `source` model), write the params directory `out`; returns it."""
  if source not in SOURCES:
    raise ValueError(f"--from {source!r}: expected one of {SOURCES}")
  checkpoint = pathlib.Path(checkpoint)
  state, torchscript = read_state_dict(checkpoint)
  reader = Reader(state, source)
  if source == "open_clip":
    arch = clip.open_clip_arch(reader, arch_name, torchscript)
    params, towers = clip.open_clip_params(reader, arch), CLIP_TOWERS
  else:
    arch, eps = clip.hf_arch(_hf_config(checkpoint, hf_config))
    if arch_name:
      raise ValueError(f"--arch applies to --from open_clip; a {source} checkpoint's config.json gives its dims")
    convert_fn, towers = (clip.hf_clip_params, CLIP_TOWERS) if source == "hf_clip" else (
        siglip.hf_siglip_params, SIGLIP_TOWERS)
    if source == "siglip" and arch.embed_dim != arch.image.width:
      raise ValueError(f"SigLIP's joint space ({arch.embed_dim}) must be its image width ({arch.image.width})")
    params, towers = convert_fn(reader, arch), tuple({**t, "norm_eps": eps} for t in towers)
  reader.check_all_taken()
  vocab_file = _tokenizer_file(source, checkpoint, tokenizer)
  config = converted_config(arch, towers, _preprocess(source, arch), _tokenizer_spec(source, arch, vocab_file),
                            source, arch_name)
  validate(config)
  _check_tree(params, _abstract_params(config), source)
  out = save_params_dir(out, config, params)
  (out / TOKENIZER_DIR).mkdir()
  shutil.copyfile(vocab_file, out / TOKENIZER_DIR / vocab_file.name)
  return out


def _abstract_params(config: Any) -> Any:
  one = config.copy_and_resolve_references()
  one.batch_size = 1
  return Experiment(one, mesh_lib.build_mesh({"data": -1}, jax.local_devices()[:1])).abstract_params


def _preprocess(source: str, arch: Arch) -> dict[str, Any]:
  if source == "siglip":
    return dict(size=arch.image_size, resize="squash", mean=SIGLIP_MEAN, std=SIGLIP_STD)
  return dict(size=arch.image_size, resize="shortest", mean=CLIP_MEAN, std=CLIP_STD)


def _tokenizer_spec(source: str, arch: Arch, vocab_file: pathlib.Path) -> dict[str, Any]:
  kind = tokenizers.SENTENCEPIECE if source == "siglip" else tokenizers.CLIP_BPE
  return dict(kind=kind, file=f"{TOKENIZER_DIR}/{vocab_file.name}", max_len=arch.context)
