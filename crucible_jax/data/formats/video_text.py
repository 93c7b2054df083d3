"""Video-text retrieval sets (MSR-VTT, YouCook2) read from pre-extracted frames.

Layout under `root`:
  {annotations}               MSR-VTT style {"videos": [{"video_id", "split"?}], "sentences": [{"video_id",
                              "caption"}]}, or YouCook2 style {"database": {YTID: {"subset", "annotations":
                              [{"id", "segment", "sentence"}]}}} where each annotated segment is one clip
                              with video_id "{YTID}_{id}"
  frames/{video_id}/*.jpg|png the video's frames, sorted by name (natural order), sampled uniformly

No video decoder is installed, so .mp4 files are not read: extract frames first, e.g.
  mkdir -p frames/video7 && ffmpeg -i videos/video7.mp4 -vf fps=2 -q:v 2 frames/video7/%05d.jpg
(for a YouCook2 segment add `-ss START -to END` and name the folder {YTID}_{id}).
"""

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from crucible_jax.data.formats import common

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
  """Centres of `num_frames` equal spans over `num_available` frames (repeats frames of short videos)."""
  return np.floor((np.arange(num_frames) + 0.5) * num_available / num_frames).astype(np.int64)


def _clips(path: str, data: Any, split: str | None, reject: Callable[[common.BadRecord], None]
           ) -> tuple[list[str], set[str], list[tuple[str, str, Any]]]:
  """(kept video ids, every listed video id, [(record name, video id, caption)]) from either style."""
  videos: list[str] = []
  listed: set[str] = set()
  captions: list[tuple[str, str, Any]] = []
  if isinstance(data, dict) and isinstance(data.get("videos"), list) and isinstance(data.get("sentences"), list):
    for n, entry in enumerate(data["videos"]):
      try:
        common.require_keys(entry, ("video_id",), path, f"videos[{n}]")
      except common.BadRecord as err:
        reject(err)
        continue
      listed.add(str(entry["video_id"]))
      if split is None or entry.get("split") == split:
        videos.append(str(entry["video_id"]))
    for n, entry in enumerate(data["sentences"]):
      try:
        common.require_keys(entry, ("video_id", "caption"), path, f"sentences[{n}]")
      except common.BadRecord as err:
        reject(err)
        continue
      captions.append((f"sentences[{n}]", str(entry["video_id"]), entry["caption"]))
    return videos, listed, captions
  if isinstance(data, dict) and isinstance(data.get("database"), dict):
    for ytid, entry in data["database"].items():
      if not isinstance(entry, dict) or not isinstance(entry.get("annotations"), list):
        reject(common.BadRecord(path, f"database[{ytid!r}]", "malformed", "needs an 'annotations' list"))
        continue
      if split is not None and entry.get("subset") != split:
        continue
      for n, clip in enumerate(entry["annotations"]):
        try:
          common.require_keys(clip, ("id", "sentence"), path, f"database[{ytid!r}].annotations[{n}]")
        except common.BadRecord as err:
          reject(err)
          continue
        videos.append(f"{ytid}_{clip['id']}")
        listed.add(videos[-1])
        captions.append((f"database[{ytid!r}].annotations[{n}]", videos[-1], clip["sentence"]))
    return videos, listed, captions
  raise ValueError(f"{path}: neither MSR-VTT ('videos' + 'sentences') nor YouCook2 ('database') annotations")


class VideoText(common.RecordSource):
  """One sample per (video, caption) (`per="caption"`) or per video with one chosen caption (`per="video"`).

  `string_id` is the video's index in `video_ids`, shared by its captions; `captions(i)` lists them all.
  `split` keeps only MSR-VTT videos whose "split" (YouCook2: "subset") equals it; None keeps every video.
  """

  def __init__(self, root: str, annotations: str = "msrvtt_test.json", *, split: str | None = None,
               per: str = "caption", caption_index: int = 0, video_frames: int = 8,
               frame_size: int | Sequence[int] = 112, channels: int = 3, text_len: int = 64,
               skip_bad_records: bool = False, tokenizer: common.Tokenizer | None = None):
    super().__init__(skip_bad_records)
    self.tokenizer = tokenizer  # None: byte tokens
    common.check_choice("per", per, ("caption", "video"))
    common.check_choice("channels", channels, (1, 3))
    common.check_positive(video_frames=video_frames, text_len=text_len)
    self.video_frames, self.channels, self.text_len = video_frames, channels, text_len
    self.frame_size = common.image_hw(frame_size)
    self.root = common.require_dir(root, "video-text root")
    self.annotation_file = common.require_file(os.path.join(root, annotations), "video-text annotations")
    frames_root = common.require_dir(os.path.join(root, "frames"), "extracted frames")
    try:
      with open(self.annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{self.annotation_file}: not valid JSON: {err}") from err
    video_ids, listed, clip_captions = _clips(self.annotation_file, data, split, self._reject)

    self._frames: dict[str, list[str]] = {}
    for video_id in dict.fromkeys(video_ids):
      try:
        self._frames[video_id] = self._list_frames(frames_root, video_id)
      except common.BadRecord as err:
        self._reject(err)
    self.video_ids = sorted(self._frames, key=common.natural_key)
    self._captions: dict[str, list[str]] = {v: [] for v in self.video_ids}
    for record, video_id, caption in clip_captions:
      if video_id not in self._captions:  # another split's video, or one skipped above (counted there)
        if video_id not in listed:
          self._reject(common.BadRecord(self.annotation_file, record, "unknown_video", video_id))
        continue
      if not isinstance(caption, str) or not caption.strip():
        self._reject(common.BadRecord(self.annotation_file, f"{record} ({video_id})", "empty_caption"))
        continue
      self._captions[video_id].append(caption.strip())
    for k, video_id in enumerate(self.video_ids):
      count = len(self._captions[video_id])
      if per == "caption":
        self.records.extend((k, c) for c in range(count))
      elif count:
        self.records.append((k, caption_index % count))
      else:
        self._reject(common.BadRecord(self.annotation_file, f"video {video_id}", "no_caption"))
    self._finish(self.annotation_file)

  def _list_frames(self, frames_root: str, video_id: str) -> list[str]:
    """Sorted frame paths of `video_id`; a clear error when only the video file exists."""
    frame_dir = os.path.join(frames_root, video_id)
    if not os.path.isdir(frame_dir):
      for folder in (os.path.join(self.root, "videos"), self.root):
        for ext in VIDEO_EXTENSIONS:
          video = os.path.join(folder, video_id + ext)
          if os.path.isfile(video):
            raise ValueError(
                f"{video}: video files cannot be decoded here (no video decoder is installed); extract frames "
                f"first: mkdir -p {frame_dir} && ffmpeg -i {video} -vf fps=2 -q:v 2 {frame_dir}/%05d.jpg")
      raise common.BadRecord(frame_dir, f"video {video_id}", "missing_frames")
    names = sorted((n for n in os.listdir(frame_dir) if n.lower().endswith(FRAME_EXTENSIONS)),
                   key=common.natural_key)
    if not names:
      raise common.BadRecord(frame_dir, f"video {video_id}", "no_frames", f"no {FRAME_EXTENSIONS} files")
    return [os.path.join(frame_dir, n) for n in names]

  def captions(self, index: int) -> list[str]:
    """Every caption of record `index`'s video."""
    return list(self._captions[self.video_ids[self.records[index][0]]])

  def caption(self, index: int) -> str:
    """The caption record `index` carries."""
    video, c = self.records[index]
    return self._captions[self.video_ids[video]][c]

  def _load(self, index: int) -> common.Sample:
    video, _ = self.records[index]
    video_id = self.video_ids[video]
    frames = self._frames[video_id]
    picked = [frames[k] for k in sample_frame_indices(len(frames), self.video_frames)]
    pixels = np.stack([common.load_image(p, f"video {video_id}", self.frame_size, self.channels) for p in picked])
    text, truncated = common.fit_text(self.caption(index), self.text_len, self.tokenizer)
    if truncated:
      self._note_truncated("text", index)
    return {"video": pixels, "text": text, "string_id": np.array(video, np.int32), **common.flags("video", "text")}
