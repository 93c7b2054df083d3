"""DigitWorld as a TFDS builder: each record is a compact recipe that `render.render_sample` turns into a sample.

Preparation writes ArrayRecord files without TensorFlow; reading is random access (`as_data_source`), which is
what grain's `MapDataset.source` wants.
"""

import dataclasses
import fcntl
import os
import pathlib
import types
from typing import Any, Iterator

import ml_collections
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from crucible_jax.data.digit_world import templates, voices
from crucible_jax.data.digit_world.draw import SPEAKERS, handwritten_image_splits

SPLITS = ("train", "val", "test", "test_heldout_speaker")
_SPLIT_SIZE_KEYS = {"train": "train_size", "val": "val_size", "test": "test_size",
                    "test_heldout_speaker": "heldout_size"}
_IMAGE_POOL_OF_SPLIT = {"train": "train", "val": "val", "test": "test", "test_heldout_speaker": "test"}


@dataclasses.dataclass(eq=False)
class DigitWorldConfig(tfds.core.BuilderConfig):
  """Everything that decides the recipes; rendering options (variant, sizes of arrays) are not here."""

  train_size: int = 20000
  val_size: int = 2000
  test_size: int = 2000
  heldout_size: int = 2000
  max_digits: int = 4
  seed: int = 0
  heldout_speaker: str = "fr_CA_f_June"
  synthetic_voices: int = 0  # eSpeak NG voices (voices.voice_table) speaking train samples beside the real ones
  synthetic_share: float = 0.0  # fraction of train samples spoken by a synthetic voice


def _config_name(sizes: tuple[int, int, int, int], max_digits: int, seed: int, heldout_speaker: str,
                 synthetic_voices: int, synthetic_share: float) -> str:
  return (f"n{'-'.join(map(str, sizes))}_d{max_digits}_s{seed}_h{heldout_speaker}"
          f"_v{synthetic_voices}x{synthetic_share:g}")


def _make_config(**fields: Any) -> DigitWorldConfig:
  sizes = tuple(fields[_SPLIT_SIZE_KEYS[s]] for s in SPLITS)
  name = _config_name(sizes, fields["max_digits"], fields["seed"], fields["heldout_speaker"],
                      fields["synthetic_voices"], fields["synthetic_share"])
  return DigitWorldConfig(name=name, description="DigitWorld recipes", **fields)


_DEFAULT_CONFIG = _make_config(train_size=20000, val_size=2000, test_size=2000, heldout_size=2000,
                               max_digits=4, seed=0, heldout_speaker="fr_CA_f_June", synthetic_voices=0,
                               synthetic_share=0.0)


class DigitWorld(tfds.core.GeneratorBasedBuilder):
  """Digit strings shown (handwriting), spoken (three speakers), written (EN/ZH captions) and animated."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Recipes: digits, handwritten image ids+pixels, speaker, template, question, seed.",
                   "1.1.0": "Synthetic eSpeak NG voices (speaker >= len(SPEAKERS)) in train."}
  BUILDER_CONFIGS = [_DEFAULT_CONFIG]
  # Metadata (README/CITATIONS) lives next to this file; set, not inferred, so it works in any install layout.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file; tfds would infer it via importlib.resources, which fails for namespace packages."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    max_digits = self.builder_config.max_digits
    features = tfds.features
    return self.dataset_info_from_configs(
        features=features.FeaturesDict({
            "index": features.Scalar(np.int64, doc="position of the record in its split"),
            "digit_string": features.Text(doc="the digit string, e.g. '371'"),
            "digits": features.Tensor(shape=(max_digits,), dtype=np.int32, doc="digits, -1 = padding"),
            "num_digits": features.Scalar(np.int32),
            "string_id": features.Scalar(np.int32, doc="unique id of the digit string"),
            "image_index": features.Tensor(shape=(max_digits,), dtype=np.int32,
                                           doc="index into sklearn load_digits per digit, -1 = padding"),
            "image_pixels": features.Tensor(shape=(max_digits, 8, 8), dtype=np.uint8,
                                            doc="the handwritten 8x8 images, values 0..16"),
            "speaker": features.Scalar(np.int32, doc="index into draw.SPEAKERS, then into the synthetic voices"),
            "template": features.Scalar(np.int32, doc="index into templates.CAPTION_TEMPLATES"),
            "question_type": features.Scalar(np.int32, doc="index into templates.QUESTION_TYPES"),
            "question_param": features.Scalar(np.int32, doc="position (nth_digit) or digit (contains)"),
            "render_seed": features.Scalar(np.int64, doc="per-sample seed for rendering"),
            "distractor_digits": features.Tensor(shape=(max_digits,), dtype=np.int32,
                                                 doc="another string of the split, for corruptions"),
            "distractor_pixels": features.Tensor(shape=(max_digits, 8, 8), dtype=np.uint8),
        }),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        disable_shuffling=True,  # record i of a split is sample i (grain shuffles at read time)
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    del dl_manager  # nothing is downloaded: both sources ship with the package
    cfg = self.builder_config
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    pixels = load_digits().images.astype(np.uint8)
    targets = load_digits().target
    pools = handwritten_image_splits(cfg.seed)
    by_class = {name: [idx[targets[idx] == d] for d in range(10)] for name, idx in pools.items()}
    return {split: self._generate_examples(split, pixels, by_class[_IMAGE_POOL_OF_SPLIT[split]])
            for split in SPLITS}

  def _generate_examples(self, split: str, pixels: np.ndarray, images_by_class: list[np.ndarray]):
    cfg = self.builder_config
    size = getattr(cfg, _SPLIT_SIZE_KEYS[split])
    if size < 1:
      raise ValueError(f"DigitWorld split {split!r} needs a positive size, got {size}")
    heldout = SPEAKERS.index(cfg.heldout_speaker)
    speakers = [heldout] if split == "test_heldout_speaker" else [i for i in range(len(SPEAKERS)) if i != heldout]
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    synthetic = cfg.synthetic_voices if split == "train" else 0  # val/test/held-out hear real voices only

    def draw_speaker() -> int:
      if synthetic and rng.random() < cfg.synthetic_share:
        return len(SPEAKERS) + int(rng.integers(synthetic))
      return int(rng.choice(speakers))

    def draw_string() -> tuple[list[int], np.ndarray, np.ndarray]:
      digits = rng.integers(0, 10, size=rng.integers(1, cfg.max_digits + 1)).tolist()
      index = np.full((cfg.max_digits,), -1, np.int32)
      index[: len(digits)] = [rng.choice(images_by_class[d]) for d in digits]
      glyphs = np.zeros((cfg.max_digits, 8, 8), np.uint8)
      glyphs[: len(digits)] = pixels[index[: len(digits)]]
      return digits, index, glyphs

    for i in range(size):
      digits, image_index, image_pixels = draw_string()
      distractor, _, distractor_pixels = draw_string()
      while distractor == digits:
        distractor, _, distractor_pixels = draw_string()
      question_type, param = templates.draw_question(digits, rng)
      yield i, {
          "index": i,
          "digit_string": "".join(map(str, digits)),
          "digits": _pad(digits, cfg.max_digits),
          "num_digits": len(digits),
          "string_id": templates.string_id(digits),
          "image_index": image_index,
          "image_pixels": image_pixels,
          "speaker": draw_speaker(),
          "template": int(rng.integers(len(templates.CAPTION_TEMPLATES))),
          "question_type": question_type,
          "question_param": param,
          "render_seed": int(rng.integers(2**31)),
          "distractor_digits": _pad(distractor, cfg.max_digits),
          "distractor_pixels": distractor_pixels,
      }


def _pad(digits: list[int], length: int) -> np.ndarray:
  out = np.full((length,), -1, np.int32)
  out[: len(digits)] = digits
  return out


def data_dir_of(data_cfg: ml_collections.ConfigDict | types.SimpleNamespace) -> str:
  """Where datasets live: `data_cfg.data_dir`, else `$CRUCIBLE_DATA_DIR`, else `~/.cache/crucible_jax`."""
  chosen = getattr(data_cfg, "data_dir", None) or os.environ.get("CRUCIBLE_DATA_DIR") or "~/.cache/crucible_jax"
  return os.path.expanduser(chosen)


def builder_config_of(data_cfg: ml_collections.ConfigDict) -> DigitWorldConfig | str:
  """The builder config (or the name of a registered one) that `data_cfg`'s recipe fields ask for."""
  if data_cfg.heldout_speaker not in SPEAKERS:
    raise ValueError(f"heldout_speaker {data_cfg.heldout_speaker!r} is not one of {SPEAKERS}")
  voices_count, share = synthetic_voices_of(data_cfg)
  config = _make_config(
      train_size=int(data_cfg.train_size), val_size=int(data_cfg.val_size), test_size=int(data_cfg.test_size),
      heldout_size=int(data_cfg.heldout_size), max_digits=int(data_cfg.max_digits), seed=int(data_cfg.seed),
      heldout_speaker=str(data_cfg.heldout_speaker), synthetic_voices=voices_count, synthetic_share=share)
  return config.name if config.name == _DEFAULT_CONFIG.name else config


def synthetic_voices_of(data_cfg: ml_collections.ConfigDict | types.SimpleNamespace) -> tuple[int, float]:
  """(voice count, train share) from `data.synthetic_voices` / `data.synthetic_share`, validated; absent = (0, 0)."""
  count, share = getattr(data_cfg, "synthetic_voices", 0), getattr(data_cfg, "synthetic_share", 0.0)
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"data.synthetic_voices={count!r} must be a count >= 0")
  if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
    raise ValueError(f"data.synthetic_share={share!r} must be a fraction in [0, 1]")
  if share > 0 and count == 0:
    raise ValueError(f"data.synthetic_share={share} needs data.synthetic_voices > 0")
  return count, float(share) if count else 0.0


def voice_bank_of(data_cfg: ml_collections.ConfigDict | types.SimpleNamespace) -> tuple[str, int] | None:
  """(path, voice count) of the synthetic voice bank `data_cfg` trains with; None without synthetic voices."""
  count, _ = synthetic_voices_of(data_cfg)
  return (str(voices.bank_path(data_dir_of(data_cfg), count, int(data_cfg.seed))), count) if count else None


def prepare_digit_world(data_cfg: ml_collections.ConfigDict) -> DigitWorld:
  """Build DigitWorld's recipes once into the data dir (idempotent) and return the builder."""
  if data_cfg.name != "digit_world":
    raise ValueError(f"data config names dataset {data_cfg.name!r}, not 'digit_world'")
  if not 1 <= data_cfg.max_digits <= 8:
    raise ValueError(f"max_digits must be in [1, 8], got {data_cfg.max_digits}")
  data_dir = pathlib.Path(data_dir_of(data_cfg))
  data_dir.mkdir(parents=True, exist_ok=True)
  # Processes sharing a data dir (test workers, the hosts of one job) prepare one at a time: a second writer would
  # replace the ArrayRecord files under a reader's feet. The second one then finds the dataset already built.
  with open(data_dir / ".digit_world.lock", "a") as lock:  # "a": never rewrites, so the dir stays untouched
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = DigitWorld(config=builder_config_of(data_cfg), data_dir=str(data_dir))
      builder.download_and_prepare(file_format="array_record")
      voices.ensure_bank(data_dir, synthetic_voices_of(data_cfg)[0], int(data_cfg.seed))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def digit_world_source(data_cfg: ml_collections.ConfigDict, split: str):
  """Random-access source of recipe dicts for `split` (prepares the dataset on first use)."""
  if split not in SPLITS:
    raise ValueError(f"unknown DigitWorld split {split!r}; choose from {SPLITS}")
  return prepare_digit_world(data_cfg).as_data_source(split=split)
