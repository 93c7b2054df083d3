"""LibriSpeech (official OpenSLR layout) for speech recognition.

Layout under `root` (the extracted `LibriSpeech/` directory):
  {subset}/{speaker}/{chapter}/{speaker}-{chapter}.trans.txt   lines `UTTID WORDS...`
  {subset}/{speaker}/{chapter}/{uttid}.flac                     16 kHz mono FLAC, UTTID = speaker-chapter-NNNN
"""

import os
import re
from typing import Any

import numpy as np

from crucible_jax.data.formats import common

_UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


class LibriSpeech(common.RecordSource):
  """One sample per utterance: audio, `audio_len`, transcript tokens in `text`, speaker index.

  `transcript(i)` is record i's reference text for WER; `string_id` is the record index, so
  `transcript(int(batch["string_id"][b]))` finds a sample's reference. Utterances are ordered by id.
  """

  def __init__(self, root: str, subset: str = "test-clean", *, sample_rate: int = 16000,
               audio_seconds: float = 35.0, text_len: int = 600, skip_bad_records: bool = False,
               tokenizer: common.Tokenizer | None = None):
    super().__init__(skip_bad_records)
    self.tokenizer = tokenizer  # None: byte tokens
    common.check_positive(sample_rate=sample_rate, audio_seconds=audio_seconds, text_len=text_len)
    self.sample_rate, self.text_len = sample_rate, text_len
    self.audio_length = int(round(sample_rate * audio_seconds))
    common.require_dir(root, "LibriSpeech root")
    self.subset_dir = common.require_dir(os.path.join(root, subset), f"LibriSpeech {subset}")
    self.speakers = sorted((d for d in os.listdir(self.subset_dir)
                            if os.path.isdir(os.path.join(self.subset_dir, d))), key=common.natural_key)
    self._speaker_index = {speaker: k for k, speaker in enumerate(self.speakers)}
    for speaker in self.speakers:
      speaker_dir = os.path.join(self.subset_dir, speaker)
      for chapter in sorted(os.listdir(speaker_dir), key=common.natural_key):
        chapter_dir = os.path.join(speaker_dir, chapter)
        if os.path.isdir(chapter_dir):
          self._read_chapter(chapter_dir, speaker, chapter)
    self._finish(self.subset_dir)

  def _read_chapter(self, chapter_dir: str, speaker: str, chapter: str) -> None:
    trans = os.path.join(chapter_dir, f"{speaker}-{chapter}.trans.txt")
    if not os.path.isfile(trans):
      self._reject(common.BadRecord(trans, f"chapter {speaker}/{chapter}", "missing_transcript"))
      return
    with open(trans, encoding="utf-8") as f:
      lines = [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    for n, line in sorted(lines, key=lambda nl: common.natural_key(nl[1].split(maxsplit=1)[0])):
      self._admit(lambda n=n, line=line: self._parse(trans, n, line, speaker, chapter))

  def _parse(self, trans: str, line_no: int, line: str, speaker: str, chapter: str) -> dict[str, Any]:
    utterance, _, words = line.partition(" ")
    match = _UTTERANCE_ID.match(utterance)
    if not match or match.group(1, 2) != (speaker, chapter):
      raise common.BadRecord(trans, f"line {line_no}", "malformed",
                             f"utterance id {utterance!r} is not {speaker}-{chapter}-NNNN")
    if not words.strip():
      raise common.BadRecord(trans, f"line {line_no} ({utterance})", "empty_transcript")
    path = os.path.join(os.path.dirname(trans), f"{utterance}.flac")
    if not os.path.isfile(path):
      raise common.BadRecord(path, utterance, "missing_audio")
    return {"id": utterance, "path": path, "transcript": " ".join(words.split()),
            "speaker": self._speaker_index[speaker]}

  def transcript(self, index: int) -> str:
    """Reference transcript of record `index` (official upper-case text, single spaces)."""
    return self.records[index]["transcript"]

  def utterance_id(self, index: int) -> str:
    """Official utterance id (speaker-chapter-NNNN) of record `index`."""
    return self.records[index]["id"]

  def _load(self, index: int) -> common.Sample:
    r = self.records[index]
    wave, sr = common.load_audio(r["path"], r["id"])
    audio, valid, audio_cut = common.fit_audio(common.resample_linear(wave, sr, self.sample_rate),
                                               self.audio_length)
    text, text_cut = common.fit_text(r["transcript"], self.text_len, self.tokenizer)
    if audio_cut:
      self._note_truncated("audio", index)
    if text_cut:
      self._note_truncated("text", index)
    return {"audio": audio, "audio_len": np.array(valid, np.int32), "text": text,
            "speaker": np.array(r["speaker"], np.int32), "string_id": np.array(index, np.int32),
            **common.flags("audio", "text")}
