"""Check a run's input files before its first step, so a bad file costs seconds, not a training run."""

import pathlib

import ml_collections
from array_record.python.array_record_module import ArrayRecordReader

from crucible_jax.data import registry

FULL_READ_BYTES = 256 * 2**20  # files up to this size are read end to end (every chunk's hash checked); larger:
# record count plus the first and last record (a truncated ArrayRecord file opens with 0 records)


class InputFileError(ValueError):
  """An input file that is missing, truncated or corrupt; the message names it."""


def check_array_record(path: pathlib.Path, expected_records: int | None) -> None:
  """Open an ArrayRecord file and read it (all of it up to FULL_READ_BYTES); InputFileError naming the file."""
  try:
    reader = ArrayRecordReader(str(path))
  except Exception as e:  # the C++ reader raises RuntimeError/ValueError with Riegeli's reason
    raise InputFileError(f"input file {path} is unreadable: {e}") from e
  try:
    count = reader.num_records()
    if expected_records is not None and count != expected_records:
      raise InputFileError(f"input file {path} holds {count} records, its dataset_info.json says "
                           f"{expected_records}: truncated or replaced; rebuild the dataset (crucible prepare)")
    if count:
      if path.stat().st_size <= FULL_READ_BYTES:
        for start in range(0, count, 1024):
          reader.read(list(range(start, min(start + 1024, count))))
      else:
        reader.read([0, count - 1])
  except InputFileError:
    raise
  except Exception as e:
    raise InputFileError(f"input file {path} is corrupt: {str(e).splitlines()[0]}; rebuild the dataset "
                         "(crucible prepare)") from e
  finally:
    try:
      reader.close()
    except Exception:  # pylint: disable=broad-except  # closing a corrupt file re-raises its read error
      pass


def check_splits(data_cfg: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
  """Open every split's files and verify them (DigitWorld: ArrayRecord record counts and chunk hashes; other
  sources: their reader opens and counts the split). InputFileError / FileNotFoundError / ValueError name the file."""
  pipeline = registry.pipeline_of(data_cfg.name)
  check = getattr(pipeline, "check_split", pipeline.num_examples)
  for split in dict.fromkeys(splits):
    check(data_cfg, split)
