"""Synthetic DigitWorld voices: eSpeak NG speaks the digits 0-9 in many voices, once per data dir, at prepare time.

eSpeak NG (PyPI `espeakng-loader` bundles the library and its voice data) is driven through ctypes. It is
deterministic only from a fresh process (its synthesiser keeps state between utterances), so the whole bank is
synthesised in one spawned process, voice after voice in table order, and cached as one .npz beside the dataset.
"""

import ctypes
import dataclasses
import multiprocessing
import os
import pathlib
from typing import Final

import espeakng_loader
import numpy as np

BANK_VERSION: Final = 1  # bump when the table or the synthesis changes: a new bank file, never a mixed one
ESPEAK_RATE: Final = 22050  # Hz; eSpeak NG's fixed output rate
LANGUAGES: Final = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029",  # English accents
                    "es", "es-419",  # Spanish (Spain, Latin America)
                    "fr", "fr-be", "fr-ch",  # French (France, Belgium, Switzerland)
                    "cmn")  # Mandarin, for the Chinese captions
VARIANTS: Final = ("", "f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7",  # eSpeak's formant sets
                   "klatt", "klatt2", "klatt3", "Annie", "belinda", "linda", "steph", "aunty", "grandma", "Andy",
                   "edward", "boris", "croak")
RATE_WPM: Final = (120, 210)  # speaking rate, words per minute
PITCH: Final = (20, 90)  # base pitch, eSpeak's 0..100 scale
PITCH_RANGE: Final = (10, 100)  # intonation: pitch range, 0 = monotone, 50 = normal, 100 = lively
SEED_SALT: Final = 0x766F696365  # "voice": the voice table's stream, apart from the recipes'
_AUDIO_OUTPUT_RETRIEVAL: Final = 1
_PARAMETER = {"rate": 1, "pitch": 3, "range": 4}  # espeak_PARAMETER values


@dataclasses.dataclass(frozen=True)
class Voice:
  """One synthetic speaker: an eSpeak NG language, variant and prosody."""

  language: str
  variant: str
  rate: int  # words per minute
  pitch: int  # 0..100
  pitch_range: int  # 0..100

  @property
  def espeak_name(self) -> str:
    """The name `espeak_SetVoiceByName` takes: language[+variant]."""
    return f"{self.language}+{self.variant}" if self.variant else self.language


def voice_table(count: int, seed: int) -> tuple[Voice, ...]:
  """`count` voices drawn from the grid above, deterministic in `seed`; languages cycle so each gets its share."""
  if count < 0:
    raise ValueError(f"synthetic voice count must be >= 0, got {count}")
  rng = np.random.default_rng([seed, SEED_SALT])
  languages = rng.permutation(len(LANGUAGES))
  return tuple(
      Voice(LANGUAGES[languages[i % len(LANGUAGES)]], VARIANTS[rng.integers(len(VARIANTS))],
            int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)), int(rng.integers(PITCH[0], PITCH[1] + 1)),
            int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))
      for i in range(count))


def bank_path(data_dir: str | os.PathLike, count: int, seed: int) -> pathlib.Path:
  """Where the bank of `voice_table(count, seed)` lives under a data dir."""
  return pathlib.Path(data_dir) / "digit_world_voices" / f"v{BANK_VERSION}_n{count}_s{seed}.npz"


def _load_espeak():
  """(libespeak-ng, its data path) from espeakng-loader, with ctypes signatures set."""
  lib = ctypes.CDLL(espeakng_loader.get_library_path())
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                               ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
  return lib, espeakng_loader.get_data_path()


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def synthesise(voices: tuple[Voice, ...], seed: int) -> list[list[np.ndarray]]:
  """clips[voice][digit]: int16 at ESPEAK_RATE. Call in a fresh process (see the module docstring)."""
  lib, data_path = _load_espeak()
  if lib.espeak_Initialize(_AUDIO_OUTPUT_RETRIEVAL, 0, data_path.encode(), 0) != ESPEAK_RATE:
    raise RuntimeError(f"eSpeak NG failed to initialise from {data_path}")
  chunks: list[np.ndarray] = []

  def collect(wav, count: int, events) -> int:
    del events
    if count > 0:
      chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
    return 0

  callback = _CALLBACK(collect)  # kept referenced until synthesis ends
  lib.espeak_SetSynthCallback(callback)
  lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
  clips = []
  for voice in voices:
    if lib.espeak_SetVoiceByName(voice.espeak_name.encode()) != 0:
      raise ValueError(f"eSpeak NG has no voice {voice.espeak_name!r}")
    for name, value in (("rate", voice.rate), ("pitch", voice.pitch), ("range", voice.pitch_range)):
      lib.espeak_SetParameter(_PARAMETER[name], value, 0)
    per_digit = []
    for digit in range(10):
      chunks.clear()
      text = str(digit).encode()
      if lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0, None, None) != 0 or lib.espeak_Synchronize() != 0:
        raise RuntimeError(f"eSpeak NG failed to speak {digit} as {voice}")
      if not chunks:
        raise RuntimeError(f"eSpeak NG spoke nothing for {digit} as {voice}")
      per_digit.append(np.concatenate(chunks))
    clips.append(per_digit)
  lib.espeak_Terminate()
  return clips


def build_bank(path: str | os.PathLike, count: int, seed: int) -> pathlib.Path:
  """Synthesise `voice_table(count, seed)` in a spawned process and write its bank to `path` (atomically)."""
  path = pathlib.Path(path)
  voices = voice_table(count, seed)
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    clips = pool.apply(synthesise, (voices, seed))
  lengths = np.array([[len(c) for c in per_digit] for per_digit in clips], np.int64)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".partial.npz")
  np.savez(partial, audio=np.concatenate([c for per_digit in clips for c in per_digit]), lengths=lengths,
           rate=ESPEAK_RATE, names=np.array([repr(v) for v in voices]))
  os.replace(partial, path)
  return path


def ensure_bank(data_dir: str | os.PathLike, count: int, seed: int) -> pathlib.Path | None:
  """The bank's path, synthesised first if absent; None when `count` is 0. Callers hold the data dir's lock."""
  if count == 0:
    return None
  path = bank_path(data_dir, count, seed)
  return path if path.is_file() else build_bank(path, count, seed)


def load_bank(path: str | os.PathLike, count: int) -> tuple[tuple[tuple[np.ndarray, ...], ...], int]:
  """(clips[voice][digit] as float32 in [-1, 1], sample rate) from a bank; errors name the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"synthetic voice bank {path} is missing; run `crucible prepare digit_world`")
  try:
    with np.load(path) as bank:
      audio, lengths, rate = bank["audio"], bank["lengths"], int(bank["rate"])
  except (OSError, KeyError, ValueError) as error:
    raise ValueError(f"corrupt synthetic voice bank {path}: {error}; delete it to rebuild") from error
  if lengths.shape != (count, 10) or lengths.sum() != len(audio):
    raise ValueError(f"synthetic voice bank {path} holds {lengths.shape} clips, expected ({count}, 10); "
                     "delete it to rebuild")
  pieces = np.split(audio.astype(np.float32) / 32768.0, np.cumsum(lengths.ravel())[:-1])
  return tuple(tuple(pieces[v * 10 : (v + 1) * 10]) for v in range(count)), rate
