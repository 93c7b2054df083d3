"""The data source of a config that carries no dataset (a converted checkpoint's): every read is a clear error."""

from typing import Any, NoReturn

import ml_collections


def _refuse(data_cfg: ml_collections.ConfigDict) -> NoReturn:
  raise ValueError(f"data.name={data_cfg.name!r} names no dataset (a converted checkpoint's config): set data.* to "
                   "a dataset (e.g. data.name='own' with data.manifest) to train or evaluate")


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """Nothing to check: the config only describes the towers' inputs."""


def make_train_iterator(data_cfg: ml_collections.ConfigDict, **unused: Any) -> NoReturn:
  _refuse(data_cfg)


def make_eval_batches(data_cfg: ml_collections.ConfigDict, split: str, **unused: Any) -> NoReturn:
  _refuse(data_cfg)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> NoReturn:
  _refuse(data_cfg)
