"""Crop geometry (for both paths) and the on-device crop-and-resize.

`sample_box` and `center_box` are written once over an array namespace `xp`
(`jax.numpy`, or the TensorFlow ops `host_decode` passes), branch-free.
"""
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from byol_jax.data import augment

MAX_ATTEMPTS = 10
# Training crops are shrunk with plain bicubic (the paper's tf.image.resize)
# up to this factor, antialiased past it, on both paths.
PLAIN_SHRINK_MAX = 3.0
NUM_UNIFORMS = 2 * MAX_ATTEMPTS + 2   # Area and aspect per attempt, y and x.
# Linear evaluation's and fine-tuning's crops (the BYOL, SimSiam and SimCLR
# protocols), whatever data.crop_scale pretraining used.
LINEAR_CROP_SCALE = (0.08, 1.0)


def scale_and_ratio(data_cfg: Any, mode: str) -> tuple[tuple[float, ...], ...]:
  """The random resized crops' (scale, ratio) ranges of a training mode."""
  scale = LINEAR_CROP_SCALE if mode == "linear" else data_cfg.crop_scale
  return (tuple(float(s) for s in scale),
          tuple(float(r) for r in data_cfg.crop_ratio))


def sample_box(u, height, width, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), xp: Any = jnp,
               integer: bool = False):
  """(y0, x0, h, w) of one random resized crop within height x width.

  Draws MAX_ATTEMPTS boxes (area fraction ~ U[scale], log(w / h) ~ U[log
  ratio]) from `u` (f32 [NUM_UNIFORMS] in [0, 1)) and keeps the first that
  fits, else the largest centred box within `ratio`. `height`, `width`:
  float32 scalars of `xp`; `integer`: whole-pixel boxes.
  """
  a = MAX_ATTEMPTS
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:a])   # [A]
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = xp.exp(lo + (hi - lo) * u[a:2 * a])                         # [A]
  w, h = xp.sqrt(area * aspect), xp.sqrt(area / aspect)
  if integer:
    w, h = xp.round(w), xp.round(h)
  fits = (w <= width) & (h <= height) & (w >= 1.0) & (h >= 1.0)
  first, found = xp.argmax(fits), xp.any(fits)
  # Fallback: the largest centred box with its aspect ratio within range.
  in_aspect = width / height
  fh = xp.minimum(xp.where(in_aspect < ratio[0], width / ratio[0], height),
                  height)
  fw = xp.minimum(xp.where(in_aspect > ratio[1], height * ratio[1], width),
                  width)
  if integer:
    fh, fw = xp.maximum(xp.round(fh), 1.0), xp.maximum(xp.round(fw), 1.0)
  h = xp.where(found, xp.take(h, first), fh)
  w = xp.where(found, xp.take(w, first), fw)
  # Uniform position of the box; whole pixels take floor(u (H - h + 1)).
  room_y, room_x = height - h, width - w
  if integer:
    y0 = xp.where(found, xp.floor(u[-2] * (room_y + 1)), xp.floor(room_y / 2))
    x0 = xp.where(found, xp.floor(u[-1] * (room_x + 1)), xp.floor(room_x / 2))
    return xp.minimum(y0, room_y), xp.minimum(x0, room_x), h, w
  return (xp.where(found, u[-2] * room_y, room_y / 2),
          xp.where(found, u[-1] * room_x, room_x / 2), h, w)


def center_box(height, width, fraction: float, xp: Any = jnp):
  """(y0, x0, side, side): the centred square of `fraction` of the shorter
  side, in whole pixels."""
  side = xp.maximum(xp.round(fraction * xp.minimum(height, width)), 1.0)
  return (xp.floor((height - side) / 2), xp.floor((width - side) / 2), side,
          side)


def sample_crop_box(rng: jax.Array, height, width,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)):
  """`sample_box` with its uniforms drawn from a JAX key (continuous box)."""
  u = jax.random.uniform(rng, (NUM_UNIFORMS,))
  return sample_box(u, jnp.asarray(height, jnp.float32),
                    jnp.asarray(width, jnp.float32), scale, ratio)


def _keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic kernel with a = -0.5 (as PIL, tf.image and jax.image)."""
  x = jnp.abs(x)
  near = (1.5 * x - 2.5) * x * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(start, length, extent, canvas: int, size: int,
                   antialias_above: float = 1.0) -> jax.Array:
  """f32 [size, canvas]: bicubic weights resampling [start, start + length)
  as `jax.image.scale_and_translate`, with the border at `extent`."""
  shrink = length / size
  src = start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * shrink - 0.5
  pos = jnp.arange(canvas, dtype=jnp.float32)
  widen = jnp.where(shrink > antialias_above, shrink, 1.0)
  weights = _keys_cubic((src[:, None] - pos[None, :]) / widen)   # [S, C]
  weights = jnp.where(pos[None, :] < extent, weights, 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  return weights / jnp.where(total == 0.0, 1.0, total)


def crop_resize(image: jax.Array, hw: jax.Array, box, size: int,
                antialias_above: float = 1.0) -> jax.Array:
  """f32 [S, S, 3] in [0, 1]: `box` (y0, x0, h, w) of a canvas [Hc, Wc, 3]
  (uint8 or float) whose real image, int32 `hw` [2], is at the top-left."""
  hw = hw.astype(jnp.float32)
  wy, wx = (resize_weights(box[i], box[i + 2], hw[i], image.shape[i], size,
                           antialias_above) for i in (0, 1))  # [S, Hc|Wc]
  hi = jax.lax.Precision.HIGHEST   # No TF32 rounding of pixels on GPUs.
  x = jnp.einsum("sh,hwc->swc", wy, augment.to_float(image), precision=hi)
  x = jnp.einsum("tw,swc->stc", wx, x, precision=hi)
  return jnp.clip(x, 0.0, 1.0)     # Cubic kernels overshoot.


def random_resized_crop(rng: jax.Array, image: jax.Array, hw: jax.Array,
                        size: int, scale: Sequence[float],
                        ratio: Sequence[float]):
  """(crop f32 [S, S, 3], box f32 [4] (y0, x0, h, w) as fractions of the
  real image) of one canvas (as `crop_resize`)."""
  h, w = hw.astype(jnp.float32)
  box = sample_crop_box(rng, h, w, scale, ratio)
  frac = jnp.stack([box[0] / h, box[1] / w, box[2] / h, box[3] / w])
  return crop_resize(image, hw, box, size), frac
