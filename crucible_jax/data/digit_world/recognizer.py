"""DigitWorld's `image_generation` evaluator: generated images read by a digit recogniser.

The recogniser is a small CNN trained only on real DigitWorld *train* images (per-position digit, the end class
past the string), once per workdir (cached in DIR/recognizer/); it reads the images the model draws from text and
speech. Its accuracy on the split's real images is reported beside, so the generated numbers have a ceiling to read
against. The trainer calls `attach(workdir=, data=, split=)` before the first `update`.
"""

import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crucible_jax.common_types import IMAGE, TEXT, present_key
from crucible_jax.data.tokenizers import Tokenizer, tokenizer_of
from crucible_jax.eval.generation import check_sources
from crucible_jax.eval.rows import present_rows, real_rows
from crucible_jax.models.encoders import max_pool_2x2
from crucible_jax.models.heads import position_targets

CLASSES = 11  # digits 0-9 and the end class


def _targets(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """[B, D] per-position classes: the digit, the end class past the string."""
  return position_targets(np.asarray(batch["digits"]), np.asarray(batch["num_digits"]), end=CLASSES - 1)


class DigitRecognizer(nn.Module):
  """Two conv/pool blocks and an MLP: image [B, H, W, C] -> per-position digit logits [B, D, 11]."""

  max_digits: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    for features in (32, 64):
      x = max_pool_2x2(nn.relu(nn.Conv(features, (3, 3))(x)))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.max_digits * CLASSES)(x).reshape(-1, self.max_digits, CLASSES)


def _shift(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Random translation by up to 1 px vertically and 2 px horizontally (the only augmentation)."""
  dy, dx = jax.random.randint(rng, (2,), jnp.array([-1, -2]), jnp.array([2, 3]))
  return jnp.roll(images, (dy, dx), axis=(1, 2))


def train_recognizer(images: np.ndarray, targets: np.ndarray, *, steps: int, batch_size: int = 128,
                     seed: int = 0) -> Any:
  """Params of a DigitRecognizer fitted to (real train images, per-position targets) with AdamW."""
  model = DigitRecognizer(targets.shape[1])
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *images.shape[1:])))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(steps // 20, 1), max(steps, 2))
  tx = optax.adamw(schedule, weight_decay=1e-4)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    def loss_fn(p):
      logits = model.apply({"params": p}, _shift(x, rng))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  order = np.random.default_rng(seed)
  rng = jax.random.key(seed + 1)
  for i in range(steps):
    rows = order.integers(0, len(images), batch_size)
    params, opt_state, _ = step(params, opt_state, images[rows], targets[rows], jax.random.fold_in(rng, i))
  return params


def recognize(params: Any, images: np.ndarray, max_digits: int) -> np.ndarray:
  """[B, D] predicted per-position classes."""
  return np.asarray(_predict(max_digits, params, jnp.asarray(images, jnp.float32)))


@functools.partial(jax.jit, static_argnums=0)
def _predict(max_digits: int, params: Any, images: jax.Array) -> jax.Array:
  return jnp.argmax(DigitRecognizer(max_digits).apply({"params": params}, images), axis=-1)


def load_or_train_recognizer(workdir: pathlib.Path, data: ml_collections.ConfigDict, *, steps: int,
                             examples: int) -> Any:
  """The recogniser cached in workdir/recognizer/, else trained on the first `examples` train images and saved."""
  from crucible_jax.data.digit_world import pipeline  # deferred: the data stack is only needed to train it once
  directory = pathlib.Path(workdir) / "recognizer"
  meta = dict(steps=steps, examples=examples, image_size=list(data.image_size), variant=str(data.variant))
  model = DigitRecognizer(int(data.max_digits))
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *data.image_size, 1)))["params"]
  if (directory / "meta.json").exists() and json.loads((directory / "meta.json").read_text()) == meta:
    return flax.serialization.from_bytes(template, (directory / "params.msgpack").read_bytes())
  images, targets = [], []
  for batch in pipeline.make_eval_batches(data, "train", batch_size=256):
    real = real_rows(batch) & np.asarray(batch.get(present_key(IMAGE), True), bool)
    images.append(np.asarray(batch[IMAGE])[real])
    targets.append(_targets(batch)[real])
    if sum(len(x) for x in images) >= examples:
      break
  params = train_recognizer(np.concatenate(images)[:examples], np.concatenate(targets)[:examples], steps=steps)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))
  (directory / "meta.json").write_text(json.dumps(meta))
  return params


class ImageGenerationEvaluator:
  """Exact-string accuracy of the recogniser on images generated from each source; a PNG grid beside the prompts."""

  heads = ("imagine",)
  inputs = (IMAGE, TEXT)  # real images for the recogniser's ceiling; prompts for the grid

  def __init__(self, sources: Sequence[str] = ("text", "audio"), recognizer_steps: int = 1500,
               recognizer_examples: int = 8192, grid_rows: int = 8):
    self.sources = check_sources(sources, "image_generation evaluator")
    self.recognizer_steps, self.recognizer_examples, self.grid_rows = recognizer_steps, recognizer_examples, grid_rows
    self.recognizer, self._plot_path, self._max_digits = None, None, None
    self._correct = {m: [] for m in (*self.sources, "real")}
    self._grid: list[dict[str, Any]] = []
    self._tokenizer: Tokenizer | None = None

  def attach(self, *, workdir: pathlib.Path, data: ml_collections.ConfigDict, split: str) -> None:
    """Load (or train once) the recogniser for this workdir; the grid goes to workdir/plots/."""
    self._max_digits = int(data.max_digits)
    self._tokenizer = tokenizer_of(data)
    self.recognizer = load_or_train_recognizer(pathlib.Path(workdir), data, steps=self.recognizer_steps,
                                               examples=self.recognizer_examples)
    self._plot_path = pathlib.Path(workdir) / "plots" / f"generated_images_{split}.png"

  def update(self, outputs, batch):
    if self.recognizer is None:
      raise ValueError("image_generation evaluator: call attach(workdir=, data=, split=) first (the trainer does)")
    real, targets = real_rows(batch), _targets(batch)
    sources = {m: np.asarray(outputs["images"][m]) for m in self.sources}
    for m, images in (*sources.items(), ("real", np.asarray(batch[IMAGE]))):
      keep = real & present_rows(outputs, batch, IMAGE if m == "real" else m)
      exact = np.all(recognize(self.recognizer, images, self._max_digits) == targets, axis=1)
      self._correct[m].append(exact[keep])
    for row in np.flatnonzero(real):
      prompt = self._tokenizer.decode(np.asarray(batch["text"][row]))
      if len(self._grid) < self.grid_rows and prompt.isascii():  # matplotlib's font has no CJK glyphs
        digits = "".join(str(d) for d in batch["digits"][row] if d >= 0)
        self._grid.append(dict(prompt=prompt, digits=digits, real=np.asarray(batch[IMAGE][row]),
                               **{m: images[row] for m, images in sources.items()}))

  def result(self):
    out = {f"image_from_{m}/accuracy": float(np.mean(np.concatenate(c))) for m, c in self._correct.items()
           if m != "real" and sum(map(len, c))}
    if sum(map(len, self._correct["real"])):
      out["image_generation/recognizer_real_accuracy"] = float(np.mean(np.concatenate(self._correct["real"])))
    if self._grid and self._plot_path is not None:
      self._plot_path.parent.mkdir(parents=True, exist_ok=True)
      plot_grid(self._grid, self.sources, self._plot_path)
    return out


def plot_grid(rows: Sequence[Mapping[str, Any]], sources: Sequence[str], path: pathlib.Path) -> None:
  """One row per sample: the text prompt, the image generated from each source, the real image."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  columns = ("prompt", *sources, "real")
  fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 0.9 * len(rows) + 0.4),
                           squeeze=False)
  for r, row in enumerate(rows):
    for c, column in enumerate(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if column == "prompt":
        ax.text(0.02, 0.5, f"{row['prompt']}\n(spoken: {row['digits']})", va="center", fontsize=7)
        ax.axis("off")
      else:
        ax.imshow(row[column][..., 0], cmap="gray_r", vmin=0.0, vmax=1.0)
      if r == 0:
        ax.set_title(column if column in ("prompt", "real") else f"from {column}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
