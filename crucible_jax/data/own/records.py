"""Records of your own collection: rows of a JSONL/CSV manifest or keys of WebDataset tar shards (no media decoded).

Manifest row: any subset of `image` (a file), `audio` (a file), `video` (a folder of frames) and `text` (a caption
or, in JSONL, a list of captions), plus optional `labels` (accepted, not trained on yet); paths are relative to the
manifest's folder. CSV: a header naming those columns, one caption per row, empty cells = absent.
Shards: tar members grouped by key (the name up to the basename's first dot): `.jpg/.jpeg/.png/.webp` image,
`.wav/.flac/.mp3` audio, `.video.<n>.<image ext>` frames, `.txt` captions (one per line), `.json` with `text`.

A record that cannot be used — malformed row, missing file, empty caption, no modality — is a `BadRecord` naming the
manifest line (or shard and key).
"""

import csv
import dataclasses
import glob
import json
import os
import re
import tarfile
import zlib
from typing import Any, Iterator

import ml_collections

from crucible_jax.common_types import AUDIO, IMAGE, TEXT, VIDEO
from crucible_jax.data.formats.common import BadRecord

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac", "mp3")
_FRAME = re.compile(rf"video\.(\d+)\.({'|'.join(IMAGE_EXTS)})$")


@dataclasses.dataclass(frozen=True)
class Member:
  """A file inside a tar shard: read `size` bytes at `offset`."""

  shard: str
  offset: int
  size: int


Ref = str | Member  # a file path (manifests) or a tar member (shards)


@dataclasses.dataclass(frozen=True)
class Row:
  """One record: where it came from (for errors), its media and captions."""

  file: str  # the manifest or shard
  where: str  # "line 7" / "key 000123"
  image: Ref | None = None
  audio: Ref | None = None
  video: tuple[Ref, ...] | None = None  # frames in order
  texts: tuple[str, ...] = ()

  def modalities(self) -> tuple[str, ...]:
    """The modalities this row carries."""
    kinds = {IMAGE: self.image, AUDIO: self.audio, VIDEO: self.video, TEXT: self.texts}
    return tuple(m for m, value in kinds.items() if value)

  def held_out(self, fraction: float) -> bool:
    """Whether the row falls in the held-out share `fraction` (a hash of its name: stable as rows are added)."""
    return zlib.crc32(f"{os.path.basename(self.file)}:{self.where}".encode()) / 2**32 < fraction


def shard_files(pattern: str, field: str = "shards") -> list[str]:
  """The tar files `pattern` matches, sorted; ValueError naming `data.<field>` when none does."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise ValueError(f"data.{field}={pattern!r} matches no file")
  return files


def _captions(value: Any, file: str, where: str) -> tuple[str, ...]:
  texts = [value] if isinstance(value, str) else value
  if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
    raise BadRecord(file, where, "malformed", f"text must be a string or a list of strings, got {value!r}")
  if not texts or not all(t.strip() for t in texts):
    raise BadRecord(file, where, "empty_caption")
  return tuple(t.strip() for t in texts)


def _existing(root: str, value: Any, file: str, where: str, key: str) -> str:
  if not isinstance(value, str) or not value:
    raise BadRecord(file, where, "malformed", f"{key} must be a path, got {value!r}")
  path = os.path.join(root, value)
  if not os.path.exists(path):
    raise BadRecord(file, where, "missing_file", f"{key} {path}")
  return path


def _frames(folder: str, file: str, where: str) -> tuple[str, ...]:
  if not os.path.isdir(folder):
    raise BadRecord(file, where, "unsupported_video", f"{folder} is not a folder of frames (containers are not read)")
  names = sorted((n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS),
                 key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
  if not names:
    raise BadRecord(file, where, "missing_file", f"no image frames in {folder}")
  return tuple(os.path.join(folder, n) for n in names)


def row_of(entry: Any, file: str, where: str) -> Row:
  """The Row of one parsed manifest entry (a dict of its columns); BadRecord when it cannot be used."""
  if not isinstance(entry, dict):
    raise BadRecord(file, where, "malformed", f"expected an object, got {type(entry).__name__}")
  entry = {k: v for k, v in entry.items() if v not in (None, "")}
  unknown = sorted(set(entry) - {IMAGE, AUDIO, VIDEO, TEXT, "labels"})
  if unknown:
    raise BadRecord(file, where, "malformed", f"unknown keys {unknown}; known: image, audio, video, text, labels")
  root = os.path.dirname(os.path.abspath(file))
  fields: dict[str, Any] = {}
  if TEXT in entry:
    fields["texts"] = _captions(entry[TEXT], file, where)
  for key in (IMAGE, AUDIO):
    if key in entry:
      fields[key] = _existing(root, entry[key], file, where, key)
  if VIDEO in entry:
    fields[VIDEO] = _frames(_existing(root, entry[VIDEO], file, where, VIDEO), file, where)
  if not fields:
    raise BadRecord(file, where, "no_modality", "the row names no image, audio, video or text")
  return Row(file, where, **fields)


def manifest_entries(path: str) -> Iterator[tuple[str, Any]]:
  """(where, entry) of every row of a .jsonl / .csv manifest; a JSON syntax error is the entry's BadRecord."""
  with open(path, encoding="utf-8", newline="") as f:
    if path.lower().endswith(".csv"):
      reader = csv.DictReader(f)
      for entry in reader:
        yield f"line {reader.line_num}", entry
      return
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield f"line {number}", json.loads(line)
      except json.JSONDecodeError as error:
        yield f"line {number}", BadRecord(path, f"line {number}", "malformed", f"not JSON: {error}")


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, Member]]]:
  """(key, {extension: member}) for each key of a tar shard, in file order."""
  groups: dict[str, dict[str, Member]] = {}
  try:
    with tarfile.open(path, "r:") as tar:
      for info in tar:
        if not info.isfile():
          continue
        folder, base = os.path.split(info.name)
        stem, dot, ext = base.partition(".")
        if dot:
          groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = Member(path, info.offset_data, info.size)
  except (tarfile.TarError, OSError) as error:
    raise ValueError(f"{path}: not a readable tar shard: {error}") from error
  yield from groups.items()


def read_member(member: Member) -> bytes:
  """The bytes of a tar member."""
  with open(member.shard, "rb") as f:
    f.seek(member.offset)
    return f.read(member.size)


def shard_row(path: str, key: str, files: dict[str, Member]) -> Row:
  """The Row of one shard key; BadRecord when it cannot be used."""
  where = f"key {key}"
  fields: dict[str, Any] = {}
  texts: list[str] = []
  if "txt" in files:
    texts = [t for t in read_member(files["txt"]).decode("utf-8", errors="replace").splitlines() if t.strip()]
    if not texts:
      raise BadRecord(path, where, "empty_caption")
  if "json" in files:
    try:
      meta = json.loads(read_member(files["json"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise BadRecord(path, where, "malformed", f"{key}.json is not JSON: {error}") from error
    if isinstance(meta, dict) and TEXT in meta:
      texts += _captions(meta[TEXT], path, where)
  if texts:
    fields["texts"] = tuple(t.strip() for t in texts)
  for modality, exts in ((IMAGE, IMAGE_EXTS), (AUDIO, AUDIO_EXTS)):
    found = [files[e] for e in exts if e in files]
    if found:
      fields[modality] = found[0]
  frames = sorted(((int(m.group(1)), member) for ext, member in files.items() if (m := _FRAME.match(ext))),
                  key=lambda item: item[0])
  if frames:
    fields[VIDEO] = tuple(member for _, member in frames)
  if "mp4" in files and VIDEO not in fields:
    raise BadRecord(path, where, "unsupported_video", "video containers (.mp4) are not read; store frames as "
                    f"{key}.video.000.png, {key}.video.001.png, ...")
  if not fields:
    raise BadRecord(path, where, "no_modality", f"members {sorted(files)} hold no image, audio, video or text")
  return Row(path, where, **fields)


def entries(data_cfg: ml_collections.ConfigDict, held_out: bool) -> Iterator[tuple[str, str, Any]]:
  """(file, where, Row or BadRecord) for the records of the train (`held_out=False`) or test collection."""
  manifest, shards = data_cfg.manifest, data_cfg.shards
  if held_out and (data_cfg.eval_manifest or data_cfg.eval_shards):
    manifest, shards = data_cfg.eval_manifest, data_cfg.eval_shards
  if manifest:
    for where, entry in manifest_entries(manifest):
      yield manifest, where, _parsed(lambda: row_of(entry, manifest, where), entry)
    return
  for path in shard_files(shards):
    for key, files in _tar_groups(path):
      yield path, f"key {key}", _parsed(lambda: shard_row(path, key, files), None)


def _parsed(parse, entry: Any) -> Row | BadRecord:
  if isinstance(entry, BadRecord):
    return entry
  try:
    return parse()
  except BadRecord as error:
    return error


def modalities_of(data_cfg: ml_collections.ConfigDict, look_at: int = 1000) -> set[str]:
  """Every modality some of the first `look_at` usable records of the train collection carries."""
  found: set[str] = set()
  usable = (row for _, _, row in entries(data_cfg, held_out=False) if isinstance(row, Row))
  for row, _ in zip(usable, range(look_at)):
    found.update(row.modalities())
  if not found:
    raise ValueError(f"own data: no usable record in {data_cfg.manifest or data_cfg.shards}")
  return found
