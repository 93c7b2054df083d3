"""Loaders for real benchmarks' official on-disk formats: grain random-access sources emitting the batch schema."""

from crucible_jax.data.formats.audioset import AudioSet
from crucible_jax.data.formats.coco import CocoCaptions
from crucible_jax.data.formats.common import BadRecord, RecordSource, fill_absent, open_benchmark
from crucible_jax.data.formats.librispeech import LibriSpeech
from crucible_jax.data.formats.video_text import VideoText
from crucible_jax.data.formats.vqa import VqaV2, build_answer_vocab

__all__ = ["AudioSet", "BadRecord", "CocoCaptions", "LibriSpeech", "RecordSource", "VideoText", "VqaV2",
           "build_answer_vocab", "fill_absent", "open_benchmark"]
