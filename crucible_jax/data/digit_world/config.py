"""DigitWorld's data config: experiments import it and override fields (no tfds, grain or rendering imported)."""

import ml_collections
from ml_collections import config_dict

from crucible_jax.common_types import MODALITIES
from crucible_jax.data.tokenizers import default_tokenizer_config


def default_data_config() -> ml_collections.ConfigDict:
  """DigitWorld's data config; experiments import it and override fields."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "digit_world"  # dataset name; others: the real benchmarks and "own" (data/registry.py)
  cfg.data_dir = config_dict.placeholder(str)  # dataset root; None → $CRUCIBLE_DATA_DIR or ~/.cache/crucible_jax
  cfg.train_size = 20000  # samples in the train split
  cfg.val_size = 2000  # samples in the val split
  cfg.test_size = 2000  # samples in the test split
  cfg.heldout_size = 2000  # samples in test_heldout_speaker (only the held-out voice)
  cfg.max_digits = 4  # longest digit string; strings have 1..max_digits digits
  cfg.seed = 0  # seed of the recipes (and of eval rendering)
  cfg.variant = "clean"  # "clean" | "corrupted" | "imbalanced"
  cfg.corrupt_prob = 0.35  # probability that each modality of a sample is corrupted ("corrupted" variant)
  cfg.speech_snr_db = config_dict.placeholder(tuple)  # (low, high) dB of the speech's noise; None = the variant's
  cfg.image_size = (16, 64)  # image canvas (height, width) in pixels; width/height slots of height x height
  cfg.video_frames = 8  # frames per video
  cfg.video_size = (16, 16)  # video frame (height, width) in pixels
  cfg.sample_rate = 8000  # audio samples per second (Hz)
  cfg.audio_seconds = 4.0  # audio length in seconds; the waveform is zero-padded to this
  cfg.text_len = 48  # caption length, tokens
  cfg.question_len = 32  # question length, tokens
  cfg.tokenizer = default_tokenizer_config()  # captions and questions: byte | sentencepiece | hf | clip_bpe
  cfg.extra_questions = 0  # more random VQA questions per sample (keys extra_questions/extra_answers); 0 = none
  cfg.caption_len = 0  # tokens of each sample's canonical caption + EOS (key `caption`, the caption task's); 0 = none
  cfg.heldout_speaker = "fr_CA_f_June"  # voice kept out of train/val/test, used only by test_heldout_speaker
  cfg.synthetic_voices = 0  # eSpeak NG voices synthesised at prepare time for the train split (0 = real voices only)
  cfg.synthetic_share = 0.0  # fraction of train samples spoken by a synthetic voice (needs synthetic_voices > 0)
  cfg.num_workers = 0  # grain worker processes rendering samples (0 = in the main process)
  cfg.prefetch_buffer = 2  # batches prefetched per process / per worker
  cfg.skip_bad_records = False  # a record that fails to render becomes a weight-0 padding sample, not an error
  cfg.drop_modalities = ml_collections.ConfigDict(  # train only: probability of hiding each modality
      {m: 0.0 for m in MODALITIES})
  return cfg
