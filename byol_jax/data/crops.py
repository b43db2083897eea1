"""Random resized crops and centre crops without TensorFlow.

The random-resized-crop sampler is the one the host pipeline uses too
(`host.py` has its TensorFlow twin): draw `attempts` candidate boxes at once,
area fraction ~ U[scale], log aspect ratio ~ U[log ratio], keep the first one
that fits in the image, else fall back to the largest centred box whose aspect
ratio is within range. Vectorised attempts keep it branch-free under jit.
"""
import io
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

MAX_ATTEMPTS = 10


def fallback_box(height, width, ratio: Sequence[float], xp=jnp):
  """The largest centred box with aspect ratio (w / h) clamped into `ratio`.

  Returns:
    (y0, x0, h, w) in pixels (arrays of `xp`, float).
  """
  height = xp.asarray(height, xp.float32)
  width = xp.asarray(width, xp.float32)
  aspect = width / height
  h = xp.where(aspect < ratio[0], width / ratio[0], height)
  w = xp.where(aspect > ratio[1], height * ratio[1], width)
  h = xp.minimum(h, height)
  w = xp.minimum(w, width)
  return (height - h) / 2.0, (width - w) / 2.0, h, w


def sample_crop_box(rng: jax.Array, height, width,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3),
                    attempts: int = MAX_ATTEMPTS):
  """Samples one random-resized-crop box in continuous pixel coordinates.

  Args:
    rng: PRNG key.
    height, width: image size (ints or traced scalars).
    scale: range of the box area as a fraction of the image area.
    ratio: range of the box aspect ratio w / h (sampled log-uniformly).
    attempts: candidates drawn before falling back to a centre crop.

  Returns:
    (y0, x0, h, w): float32 scalars.
  """
  # One PRNG call for everything (cheaper to compile than one per draw).
  u = jax.random.uniform(rng, (2 * attempts + 2,))               # [2A + 2]
  height = jnp.asarray(height, jnp.float32)
  width = jnp.asarray(width, jnp.float32)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(lo + (hi - lo) * u[attempts:2 * attempts])     # [A]
  w = jnp.sqrt(area * aspect)                                      # [A]
  h = jnp.sqrt(area / aspect)
  fits = (w <= width) & (h <= height)
  first = jnp.argmax(fits)
  found = jnp.any(fits)
  fy, fx, fh, fw = fallback_box(height, width, ratio)
  h = jnp.where(found, h[first], fh)
  w = jnp.where(found, w[first], fw)
  y0 = jnp.where(found, u[-2] * (height - h), fy)
  x0 = jnp.where(found, u[-1] * (width - w), fx)
  return y0, x0, h, w


def resize_box(image: jax.Array, box, size: int,
               antialias: bool = True) -> jax.Array:
  """Bicubic (Keys, a = -0.5) resize of the box of one image to size x size.

  Args:
    image: [H, W, C] float.
    box: (y0, x0, h, w) continuous pixel coordinates (traced is fine).
    size: output side.
    antialias: widen the kernel when downsampling.

  Returns:
    [size, size, C] float32 (not clipped: cubic kernels overshoot).
  """
  y0, x0, h, w = box
  scale = jnp.stack([size / h, size / w])                     # [2]
  translation = -jnp.stack([y0, x0]) * scale                  # [2]
  return jax.image.scale_and_translate(
      image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1),
      scale, translation, method="cubic", antialias=antialias)


def random_resized_crop(rng: jax.Array, image: jax.Array, size: int,
                        scale: Sequence[float], ratio: Sequence[float]):
  """One random resized crop of one image.

  Args:
    rng: PRNG key.
    image: [H, W, 3] uint8 or float in [0, 1].
    size: output side S.
    scale, ratio: as `sample_crop_box`.

  Returns:
    (crop f32[S, S, 3] in [0, 1], box f32[4] = (y0, x0, h, w) as fractions
    of the image height / width).
  """
  hgt, wid = image.shape[0], image.shape[1]
  box = sample_crop_box(rng, hgt, wid, scale, ratio)
  x = image.astype(jnp.float32)
  if jnp.issubdtype(image.dtype, jnp.integer):
    x = x * (1.0 / 255.0)
  crop = jnp.clip(resize_box(x, box, size), 0.0, 1.0)
  frac = jnp.stack([box[0] / hgt, box[1] / wid, box[2] / hgt, box[3] / wid])
  return crop, frac


# ---------------------------------------------------------------------------
# Host-side (numpy / PIL) helpers for in-memory sets.
# ---------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 [H, W, 3] with PIL (raises on corrupt data)."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def center_crop_box(height: int, width: int, fraction: float
                    ) -> tuple[int, int, int, int]:
  """Centred square of `fraction` of the shorter side: (y0, x0, side, side)."""
  side = max(1, int(round(fraction * min(height, width))))
  return (height - side) // 2, (width - side) // 2, side, side


def center_crop_resize(image: np.ndarray, size: int, fraction: float
                       ) -> np.ndarray:
  """Centre crop of `fraction` of the shorter side, bicubic resize (PIL).

  Args:
    image: uint8 [H, W, 3].
    size: output side.
    fraction: side of the crop over the shorter image side.

  Returns:
    uint8 [size, size, 3].
  """
  y0, x0, h, w = center_crop_box(image.shape[0], image.shape[1], fraction)
  crop = image[y0:y0 + h, x0:x0 + w]
  if crop.shape[:2] == (size, size):
    return np.ascontiguousarray(crop)
  return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def resize_shorter_center(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size` (bicubic), then the centred size x size square."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  s = size / min(h, w)
  nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
  im = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  y0, x0 = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(im[y0:y0 + size, x0:x0 + size])
