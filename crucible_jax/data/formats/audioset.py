"""AudioSet segments (official CSVs) with locally stored audio, for multi-label audio tagging.

Layout under `root`:
  {csv}                        e.g. balanced_train_segments.csv / eval_segments.csv: lines starting with '#' are
                               comments; rows `YTID, start_seconds, end_seconds, "mid1,mid2,..."`
  class_labels_indices.csv     header `index,mid,display_name`, one row per class (527 in the release)
  audio/{YTID}_{start:.3f}.wav|.flac   the segment already cut (start as in the CSV, 3 decimals), or
  audio/{YTID}.wav|.flac               the whole video's audio, cut here to [start_seconds, end_seconds)
Segment files win over whole-video files. Segments without a local file (unavailable videos) are bad records
("missing_audio"): pass `skip_bad_records=True` to drop and count them.
"""

import csv
import os
from typing import Any, Iterable, Iterator

import numpy as np

from crucible_jax.data.formats import common

AUDIO_EXTENSIONS = (".wav", ".flac")


def read_class_labels(path: str) -> list[tuple[str, str]]:
  """(mid, display_name) per class index from `class_labels_indices.csv`; ValueError naming bad rows."""
  common.require_file(path, "AudioSet class labels")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  classes: dict[int, tuple[str, str]] = {}
  for n, row in enumerate(rows):
    if not {"index", "mid", "display_name"} <= set(row) or not str(row["index"]).strip().isdigit():
      raise ValueError(f"{path}: row {n + 2} is not `index,mid,display_name`: {row}")
    classes[int(row["index"])] = (row["mid"].strip(), row["display_name"].strip())
  if sorted(classes) != list(range(len(classes))):
    raise ValueError(f"{path}: class indices are not 0..{len(classes) - 1} without gaps")
  return [classes[k] for k in range(len(classes))]


class AudioSet(common.RecordSource):
  """One sample per segment: audio resampled to `sample_rate`, padded/truncated to `audio_seconds`.

  `labels(i)` is the multi-hot float32[num_classes] target of record i; `string_id` is the record index, so
  `labels(int(batch["string_id"][b]))` finds a sample's labels. With `with_labels=True` samples also carry it
  under "labels" (a key the batch schema does not have yet).
  """

  def __init__(self, root: str, csv: str = "balanced_train_segments.csv", *,  # pylint: disable=redefined-outer-name
               sample_rate: int = 16000, audio_seconds: float = 10.0, with_labels: bool = False,
               skip_bad_records: bool = False):
    super().__init__(skip_bad_records)
    common.check_positive(sample_rate=sample_rate, audio_seconds=audio_seconds)
    self.sample_rate, self.with_labels = sample_rate, with_labels
    self.audio_length = int(round(sample_rate * audio_seconds))
    common.require_dir(root, "AudioSet root")
    self.audio_dir = common.require_dir(os.path.join(root, "audio"), "AudioSet audio")
    self.segment_file = common.require_file(os.path.join(root, csv), "AudioSet segments")
    self.classes = read_class_labels(os.path.join(root, "class_labels_indices.csv"))
    self._class_index = {mid: k for k, (mid, _) in enumerate(self.classes)}
    self._files = set(os.listdir(self.audio_dir))
    with open(self.segment_file, newline="", encoding="utf-8") as f:
      for line_no, row in enumerate(csv_rows(f), start=1):
        if row is not None:
          self._admit(lambda row=row, line_no=line_no: self._parse(line_no, row))
    self._finish(self.segment_file)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def _parse(self, line_no: int, row: list[str]) -> dict[str, Any]:
    record = f"line {line_no}"
    if len(row) != 4:
      raise common.BadRecord(self.segment_file, record, "malformed",
                             f"expected `YTID, start, end, \"labels\"`, got {len(row)} fields")
    ytid, start, end, mids = (field.strip() for field in row)
    try:
      start_s, end_s = float(start), float(end)
    except ValueError as err:
      raise common.BadRecord(self.segment_file, record, "malformed", f"bad times {start!r}, {end!r}") from err
    record = f"line {line_no} ({ytid})"
    if not ytid or end_s <= start_s:
      raise common.BadRecord(self.segment_file, record, "malformed", "empty id or end <= start")
    labels = [m.strip() for m in mids.split(",") if m.strip()]
    unknown = [m for m in labels if m not in self._class_index]
    if not labels or unknown:
      raise common.BadRecord(self.segment_file, record, "unknown_label" if unknown else "no_label", str(unknown))
    for stem, cut in ((f"{ytid}_{start_s:.3f}", None), (ytid, (start_s, end_s))):
      for ext in AUDIO_EXTENSIONS:
        if stem + ext in self._files:
          return {"ytid": ytid, "path": os.path.join(self.audio_dir, stem + ext), "cut": cut,
                  "labels": sorted(self._class_index[m] for m in labels)}
    raise common.BadRecord(os.path.join(self.audio_dir, f"{ytid}_{start_s:.3f}{{.wav,.flac}}"), record,
                           "missing_audio", f"nor {ytid}{{.wav,.flac}}")

  def labels(self, index: int) -> np.ndarray:
    """Multi-hot float32[num_classes] labels of record `index`."""
    multi_hot = np.zeros((self.num_classes,), np.float32)
    multi_hot[self.records[index]["labels"]] = 1.0
    return multi_hot

  def label_names(self, index: int) -> list[str]:
    """Display names of record `index`'s labels."""
    return [self.classes[k][1] for k in self.records[index]["labels"]]

  def _load(self, index: int) -> common.Sample:
    r = self.records[index]
    cut = r["cut"] or (None, None)
    wave, sr = common.load_audio(r["path"], f"segment {r['ytid']}", *cut)
    audio, valid, truncated = common.fit_audio(common.resample_linear(wave, sr, self.sample_rate),
                                               self.audio_length)
    if truncated:
      self._note_truncated("audio", index)
    sample = {"audio": audio, "audio_len": np.array(valid, np.int32), "string_id": np.array(index, np.int32),
              **common.flags("audio")}
    if self.with_labels:
      sample["labels"] = self.labels(index)
    return sample


def csv_rows(lines: Iterable[str]) -> Iterator[list[str] | None]:
  """csv rows of an AudioSet segment file, None in place of comment and blank lines (keeps line numbers)."""
  for line in lines:
    if not line.strip() or line.lstrip().startswith("#"):
      yield None
    else:
      yield next(csv.reader([line], skipinitialspace=True))
