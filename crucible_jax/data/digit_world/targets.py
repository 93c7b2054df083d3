"""DigitWorld's targets for the generic generation tasks: the canonical caption the converter learns to write
("three seven one" + EOS in byte tokens, rendered into each sample as `caption` when `data.caption_len` > 0) and
its digit string drawn in the reference hand (`imagine/<m>` with `model.converter.image_target="reference"`)."""

import functools
from typing import Final, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from crucible_jax.data.digit_world.templates import ENGLISH_WORDS, english
from crucible_jax.data.tokenizers import byte

WORD_SLOT: Final = 1 + max(map(len, ENGLISH_WORDS))  # caption tokens per digit: the longest word + a space / EOS


def caption_text(digits: Sequence[int] | np.ndarray) -> str:
  """The canonical caption of a digit string (padding -1 dropped): "three seven one"."""
  return english(digits)


def caption_length(max_digits: int) -> int:
  """Tokens the longest caption of `max_digits` digits takes, EOS included."""
  return WORD_SLOT * max_digits


@functools.lru_cache(maxsize=16384)
def _caption(digits: tuple[int, ...], length: int) -> np.ndarray:
  tokens = byte.ByteTokenizer(length).encode(caption_text(digits), add_eos=True)
  tokens.flags.writeable = False
  return tokens


def caption_target(digits: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
  """int32[length]: the canonical caption's byte tokens, then EOS, then padding (0)."""
  return _caption(tuple(int(d) for d in digits), int(length)).copy()


def reference_images(glyphs: Float[Array, "10 h h"], digits: Int[Array, "b d"], width: int
                     ) -> Float[Array, "b h w 1"]:
  """Digit k's reference glyph in the k-th h x h box from the left (DigitWorld's form layout), padding blank."""
  batch, slots = digits.shape
  box = glyphs.shape[-1]
  if slots * box > width:
    raise ValueError(f"{slots} digit boxes of {box} pixels do not fit an image {width} pixels wide")
  drawn = jnp.where((digits >= 0)[..., None, None], jnp.asarray(glyphs)[jnp.clip(digits, 0, 9)], 0.0)
  row = jnp.transpose(drawn, (0, 2, 1, 3)).reshape(batch, box, slots * box)
  return jnp.pad(row, ((0, 0), (0, 0), (0, width - slots * box)))[..., None]
