"""Linear probes: how much a frozen encoder's pooled features say about the digits (measures a weak modality).

Logistic regression (scikit-learn) on standardised mean-pooled encoder features: one classifier for the first
digit, and one per digit position (digit or "no digit") whose joint correctness gives whole-string accuracy.
"""

import dataclasses
import itertools
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jaxtyping import Array, Float

from crucible_jax.models import heads

END = 10  # probe target of a position past the sequence's end: above every label (DigitWorld's digits 0-9)


@dataclasses.dataclass
class Features:
  """Pooled features of real samples and their labels (host numpy)."""

  x: np.ndarray  # f32[N, W] mean-pooled encoder tokens
  digits: np.ndarray  # i32[N, D] digit string, -1 = padding
  num_digits: np.ndarray  # i32[N]


def _pooled(module: nn.Module, batch: Mapping[str, Array], modality: str) -> Float[Array, "b w"]:
  """Mean-pooled tokens of one modality's encoder on every sample (deterministic, the router bypassed)."""
  return heads.masked_mean_pool(*module.encode(batch, False, (modality,), route=False)[modality])


def extract_features(model: nn.Module, params: Any, batches: Iterable[Mapping[str, np.ndarray]], modality: str,
                     max_batches: int | None = None) -> Features:
  """Pooled `modality` features of the real (weight > 0) samples of up to `max_batches` batches."""
  fn = jax.jit(lambda p, b: model.apply({"params": p}, b, modality, method=_pooled))
  xs, digits, lengths = [], [], []
  for batch in itertools.islice(batches, max_batches):
    keep = np.asarray(batch["weight"]) > 0
    xs.append(np.asarray(fn(params, dict(batch)), np.float32)[keep])
    digits.append(np.asarray(batch["digits"])[keep])
    lengths.append(np.asarray(batch["num_digits"])[keep])
  if not xs:
    raise ValueError(f"no batches to extract {modality!r} features from")
  return Features(np.concatenate(xs), np.concatenate(digits), np.concatenate(lengths))


def position_targets(features: Features) -> np.ndarray:
  """i32[N, D]: the label at each position, END past the end."""
  return heads.position_targets(features.digits, features.num_digits, end=END)


def _fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float) -> np.ndarray:
  """Standardise, fit multinomial logistic regression, predict the test labels."""
  from sklearn.linear_model import LogisticRegression  # deferred: heavy import, only probes need it
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  if len(np.unique(train_y)) == 1:
    return np.full(len(test_x), train_y[0])
  probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
  return probe.fit(train_x, train_y).predict(test_x)


def linear_probe(train: Features, test: Features, c: float = 1.0) -> dict[str, float]:
  """Test accuracies of probes fit on `train`: first digit, whole string, and the majority-class references."""
  first = _fit_predict(train.x, train.digits[:, 0], test.x, c)
  train_pos, test_pos = position_targets(train), position_targets(test)
  per_position = np.stack([_fit_predict(train.x, train_pos[:, d], test.x, c) for d in range(train_pos.shape[1])], 1)
  majority = np.bincount(train.digits[:, 0], minlength=10).argmax()
  return {
      "first_digit": float(np.mean(first == test.digits[:, 0])),
      "string": float(np.mean(np.all(per_position == test_pos, axis=1))),
      "first_digit_chance": float(np.mean(test.digits[:, 0] == majority)),
      "train_examples": float(len(train.x)),
      "test_examples": float(len(test.x)),
  }
