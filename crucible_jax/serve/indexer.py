"""`crucible index`: embed a collection with an exported model into a new (or, with --append, existing) index."""

import argparse
import pathlib
import shutil
import sys
from typing import Any

import tqdm

from crucible_jax import inference
from crucible_jax.serve import sources
from crucible_jax.serve.artifact import ExportDir
from crucible_jax.serve.export import export_model
from crucible_jax.serve.store import EXPORT_DIR, Index


def prepare_index(args: argparse.Namespace) -> Index:
  """The index to add to: existing (--append) or new, with the model exported or copied into it."""
  out = pathlib.Path(args.out)
  if args.append:
    if args.workdir or args.export:
      raise ValueError("--append adds with the index's own model; drop --workdir/--export")
    return Index.open(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory or pass --append")
  if bool(args.workdir) == bool(args.export):
    raise ValueError("give exactly one of --workdir W and --export DIR")
  if args.workdir:
    export_model(inference.load(args.workdir), out / EXPORT_DIR)
  else:
    if not (pathlib.Path(args.export) / inference.CONFIG_FILE).is_file():
      raise FileNotFoundError(f"{args.export} has no {inference.CONFIG_FILE}: not a `crucible export` directory")
    shutil.copytree(args.export, out / EXPORT_DIR)
  return Index.create(out, ExportDir(out / EXPORT_DIR).manifest["joint_dim"])


def build(index: Index, spec: str, batch_size: int, progress: bool = True) -> dict[str, int]:
  """Embed every item of the source `spec` into `index`; counts of items added per modality."""
  export = ExportDir(index.export_dir)
  config = inference.read_config(index.export_dir)
  total, batches = sources.open_source(spec, config.data, batch_size)
  added: dict[str, int] = {}
  skipped: dict[str, int] = {}
  with tqdm.tqdm(total=total, desc=f"indexing {spec}", unit="sample", disable=not progress) as bar:
    for samples, batch in batches:
      for modality, (inputs, records) in batch.items():
        if modality not in export.modalities:
          skipped[modality] = skipped.get(modality, 0) + len(records)
        elif records:
          index.add(modality, export.embed(modality, inputs), records)
          added[modality] = added.get(modality, 0) + len(records)
      bar.update(samples)
  for modality, count in skipped.items():
    print(f"crucible: note: the model has no {modality} encoder; {count} {modality} items of {spec} were not indexed",
          file=sys.stderr)
  return added


def run(args: argparse.Namespace, config: Any) -> int:
  """`crucible index`: 0 on success, 1 (with the reason) when an input is unusable."""
  out = pathlib.Path(args.out)
  created = not args.append and not out.exists()
  try:
    index = prepare_index(args)
    added = build(index, args.data, args.batch_size)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    if created and out.exists():  # no half-built index is left behind
      shutil.rmtree(out)
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  print(f"indexed {', '.join(f'{n} {m}' for m, n in added.items())} into {args.out} ({len(index)} items in all)")
  index.close()
  return 0
