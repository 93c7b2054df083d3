"""`crucible zeroshot`: zero-shot top-1/top-5 classification of images (and audio) from class names and templates.

`--data digit_world` reads a DigitWorld split rendered with the model's own data config and labels it by
`--task` (crucible_jax/data/digit_world/zero_shot.py). `--data DIR` reads a class-folder tree, `DIR/<class>/<file>`
(ImageNet's layout: image files and/or WAVs); `--classes FILE` names the folders' classes, one per line in sorted
folder order (default: the folder names). `--templates FILE` has one prompt per line, `{}` marking the class name.
"""

import argparse
import functools
import json
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
AUDIO_SUFFIXES = (".wav",)
INPUT_KEYS = {"image": ("image",), "audio": ("audio", "audio_len")}  # batch keys each classified modality reads


def add_parser(sub: Any) -> None:
  """The `zeroshot` subcommand's arguments."""
  p = sub.add_parser("zeroshot", help="zero-shot classification accuracy from class names and prompt templates")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--params", help="params directory (crucible convert's --out)")
  source.add_argument("--workdir", help="a crucible train workdir (its newest checkpoint)")
  p.add_argument("--data", required=True, help="'digit_world', or a folder DIR/<class>/<image or WAV files>")
  p.add_argument("--split", default="test", help="DigitWorld split (default test); a name for a folder's results")
  p.add_argument("--task", default="digit", help="DigitWorld task: digit (one-digit samples) or string")
  p.add_argument("--classes", help="file: one class name per line, in sorted folder order (folder data only)")
  p.add_argument("--templates", help="file: one prompt template per line with '{}' for the class name")
  p.add_argument("--modalities", nargs="+", choices=tuple(INPUT_KEYS), help="default: every one found and encoded")
  p.add_argument("--batch", type=int, default=256, help="embedding batch size")
  p.add_argument("--json", required=True, help="output: {split/zero_shot_<task>/<modality>_top<k>: accuracy}")


def _lines(path: str, what: str) -> list[str]:
  """The non-empty lines of `path`; ValueError naming the file when there are none."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{what} file not found: {path}")
  lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not lines:
    raise ValueError(f"{what} file {path} has no non-empty line")
  return lines


def _folder(root: pathlib.Path, classes: Sequence[str] | None) -> tuple[list[str], dict[str, list[str]], dict]:
  """(class names, files per modality, labels per modality) of a class-folder tree."""
  if not root.is_dir():
    raise FileNotFoundError(f"--data {root} is neither 'digit_world' nor a directory")
  folders = sorted(p for p in root.iterdir() if p.is_dir())
  if not folders:
    raise ValueError(f"--data {root} has no class folders (expected {root}/<class>/<files>)")
  if classes is not None and len(classes) != len(folders):
    raise ValueError(f"--classes names {len(classes)} classes but {root} has {len(folders)} class folders")
  files = {m: [] for m in INPUT_KEYS}
  labels = {m: [] for m in INPUT_KEYS}
  for label, folder in enumerate(folders):
    for file in sorted(folder.iterdir()):
      modality = ("image" if file.suffix.lower() in IMAGE_SUFFIXES else
                  "audio" if file.suffix.lower() in AUDIO_SUFFIXES else None)
      if modality is not None:
        files[modality].append(str(file))
        labels[modality].append(label)
  names = list(classes) if classes is not None else [f.name for f in folders]
  return names, files, {m: np.asarray(v, np.int64) for m, v in labels.items()}


def _digit_world_batches(model: Any, split: str, batch: int) -> Iterator[dict[str, np.ndarray]]:
  """The real rows of every eval batch of `split`, rendered with the model's data config."""
  from crucible_jax.data.digit_world import pipeline  # pylint: disable=g-import-not-at-top
  if model.config.data.name != "digit_world":
    raise ValueError(f"--data digit_world needs a model trained on DigitWorld; this one's data.name is "
                     f"{model.config.data.name!r}")
  for raw in pipeline.make_eval_batches(model.config.data, split, batch_size=batch):
    real = np.asarray(raw["weight"]) > 0
    yield {k: np.asarray(v)[real] for k, v in raw.items()}


def _digit_world(model: Any, args: argparse.Namespace, modalities: Sequence[str]):
  """(class names, default templates, embeddings and labels per modality) of a DigitWorld task."""
  from crucible_jax.common_types import present_key  # pylint: disable=g-import-not-at-top
  from crucible_jax.data.digit_world import zero_shot as tasks  # pylint: disable=g-import-not-at-top
  label = tasks.task_of(args.task)
  parts, present, digits, num_digits = {m: [] for m in modalities}, {m: [] for m in modalities}, [], []
  for b in _digit_world_batches(model, args.split, args.batch):
    digits.append(b["digits"])
    num_digits.append(b["num_digits"])
    for m in modalities:
      rows = np.asarray(b[present_key(m)], bool)
      present[m].append(rows)
      if rows.any():
        parts[m].append(model.embed(m, {k: b[k][rows] for k in INPUT_KEYS[m]}))
  task = label(np.concatenate(digits), np.concatenate(num_digits))
  embeddings, labels = {}, {}
  for m in modalities:
    rows = np.concatenate(present[m])
    if not (rows & task.keep).any():
      raise ValueError(f"DigitWorld {args.split} has no {m} sample for task {args.task!r}")
    embeddings[m] = np.concatenate(parts[m])[task.keep[rows]]
    labels[m] = task.labels[rows[task.keep]]
  return list(task.class_names), tasks.TEMPLATES, embeddings, labels


def _embedder(model: Any, root: pathlib.Path, batch: int) -> tuple[Callable, Callable]:
  """(texts -> vectors, (modality, files) -> vectors), both in chunks of `batch`."""
  from crucible_jax import embed  # pylint: disable=g-import-not-at-top
  from crucible_jax.eval.zero_shot import embed_in_chunks  # pylint: disable=g-import-not-at-top
  read = {"image": functools.partial(embed.image_inputs, model), "audio": functools.partial(embed.audio_inputs, model)}

  def texts(strings: Sequence[str]) -> np.ndarray:
    return embed_in_chunks(lambda x: model.embed("text", x), embed.text_inputs(model, root, strings), batch)

  def files(modality: str, paths: Sequence[str]) -> np.ndarray:
    chunks = [model.embed(modality, read[modality](paths[i:i + batch])) for i in range(0, len(paths), batch)]
    return np.concatenate(chunks)

  return texts, files


def evaluate(model: Any, root: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
  """The zero-shot results of `args` for a loaded model (keys split/zero_shot_<task>/<modality>_<metric>)."""
  from crucible_jax.eval import zero_shot  # pylint: disable=g-import-not-at-top
  embed_texts, embed_files = _embedder(model, root, args.batch)
  wanted = list(args.modalities or (m for m in INPUT_KEYS if m in model.modalities))
  lacking = [m for m in ("text", *wanted) if m not in model.modalities]
  if lacking:
    raise ValueError(f"this model has no {lacking[0]!r} encoder; it encodes {model.modalities}")
  if args.data == "digit_world":
    if args.classes:
      raise ValueError("--classes is for folder data; a DigitWorld task names its own classes")
    names, templates, embeddings, labels = _digit_world(model, args, wanted)
    task = f"zero_shot_{args.task}"
  else:
    names, files, labels = _folder(pathlib.Path(args.data), _lines(args.classes, "--classes") if args.classes else None)
    wanted = [m for m in wanted if files[m]] if not args.modalities else wanted
    empty = [m for m in wanted if not files[m]]
    if empty or not wanted:
      raise ValueError(f"--data {args.data} has no {(empty or ['image or audio'])[0]} files in its class folders")
    embeddings = {m: embed_files(m, files[m]) for m in wanted}
    templates, task = ("{}",), "zero_shot"
  if args.templates:
    templates = tuple(_lines(args.templates, "--templates"))
  scores = zero_shot.evaluate(embed_texts, names, templates, embeddings, {m: labels[m] for m in embeddings})
  scores |= {"classes": float(len(names)), "templates": float(len(templates))}
  return {f"{args.split}/{task}/{key.replace('/', '_')}": value for key, value in scores.items()}


def run(args: argparse.Namespace, config: Any) -> int:
  """Load the model, classify, write --json; exit 1 with one line naming a bad input."""
  del config
  from crucible_jax import inference  # pylint: disable=g-import-not-at-top  (jax: keep --help fast)
  root = pathlib.Path(args.params or args.workdir)
  try:
    result = evaluate(inference.load(root), root, args)
  except (ValueError, FileNotFoundError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, sort_keys=True))
  print(json.dumps(result, indent=1, sort_keys=True))
  return 0
