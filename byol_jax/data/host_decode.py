"""tf.data element functions of the host path: crop windows and decoding.

A crop that fits the C x C canvas (C = data.canvas_size, default S) travels
as it is and the accelerators resample it (`host.finish_fn`).
"""
import functools
import types

import tensorflow as tf

from byol_jax.data import crops
from byol_jax.data import tfds_source  # noqa: F401  (hides TF's GPUs)

_DCT_RATIOS = (1, 2, 4, 8)   # The scales libjpeg decodes at directly.

# The names `crops.sample_box` and `crops.center_box` use, in TensorFlow.
_TF_OPS = types.SimpleNamespace(
    sqrt=tf.sqrt, exp=tf.exp, where=tf.where, minimum=tf.minimum,
    maximum=tf.maximum, floor=tf.floor, round=tf.round, any=tf.reduce_any,
    take=tf.gather,
    argmax=lambda x: tf.argmax(tf.cast(x, tf.int32), output_type=tf.int32))


def crop_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """int32 [4] (y, x, h, w): a random resized crop in whole pixels, from a
  stateless seed int64 [2] (`scale`, `ratio` as `crops.sample_box`)."""
  u = tf.random.stateless_uniform([crops.NUM_UNIFORMS], seed)
  return tf.cast(tf.stack(crops.sample_box(
      u, tf.cast(height, tf.float32), tf.cast(width, tf.float32), scale,
      ratio, xp=_TF_OPS, integer=True)), tf.int32)


def center_window(height, width, fraction: float):
  """The evaluation centre crop: int32 [4] (y, x, side, side)."""
  return tf.cast(tf.stack(crops.center_box(
      tf.cast(height, tf.float32), tf.cast(width, tf.float32), fraction,
      xp=_TF_OPS)), tf.int32)


def _pad(image, hw, canvas: int):
  """uint8 [h, w, 3] at the top-left of a zero [canvas, canvas, 3]."""
  # Two concatenations: tf.pad is several times slower on large canvases.
  image = tf.concat([image, tf.zeros([hw[0], canvas - hw[1], 3], tf.uint8)], 1)
  return tf.concat([image, tf.zeros([canvas - hw[0], canvas, 3], tf.uint8)], 0)


def fit(crop, size: int, canvas: int | None = None,
        device_resize: bool = True, fast: bool = True):
  """(uint8 [C, C, 3] canvas, int32 [2] size on it) of a crop [h, w, 3].

  A crop that fits goes as it is; a larger one is shrunk with bicubic,
  antialiased past a 3x shrink if `fast` (as the paper), else always (PIL).
  """
  canvas = int(canvas or size)
  hw = tf.shape(crop)[:2]

  def resize(antialias):
    out = tf.image.resize(crop, [size, size], "bicubic", antialias=antialias)
    out = tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)
    square = tf.constant([size, size])
    return (_pad(out, square, canvas) if canvas > size else out), square

  fits = tf.reduce_all(hw <= canvas) if device_resize else tf.constant(False)
  large = tf.cast(tf.reduce_max(hw), tf.float32) > (
      crops.PLAIN_SHRINK_MAX if fast else 1.0) * size
  image, hw = tf.switch_case(                   # One branch op, not two.
      tf.where(fits, 0, tf.where(large, 2, 1)),
      [lambda: (_pad(crop, hw, canvas), hw), lambda: resize(False),
       lambda: resize(True)])
  return tf.ensure_shape(image, [canvas, canvas, 3]), hw


def decode_crops(data, form: str, window_fns, size: int, flip_seed=None,
                 canvas: int | None = None, device_resize: bool = True,
                 fast: bool = True):
  """Decodes `data` once and cuts one crop per window function.

  A JPEG is decoded over the union of the windows, if `fast` at the DCT
  scale 1/r (r in 1, 2, 4, 8) that keeps the smallest crop's shorter side
  >= S. `form`: 'encoded', 'jpeg' or 'pixels' (uint8 [H, W, 3]).
  Returns ([(canvas, size)] as `fit`, [f32 [4] windows as fractions]).
  """
  def cut(shape, decode, scaled):
    windows = [fn(shape[0], shape[1]) for fn in window_fns]
    shorter = tf.reduce_min(tf.stack([tf.reduce_min(w[2:]) for w in windows]))
    k = tf.add_n([tf.cast(shorter >= m * size, tf.int32)   # r = 2 ** k.
                  for m in _DCT_RATIOS[1:]]) if scaled else tf.constant(0)
    r = tf.bitwise.left_shift(1, k)
    # Windows at scale 1/r: [lo, hi) within the ceil(shape / r) image.
    limit = -(-shape[:2] // r)
    boxes = [(w[:2] // r, tf.minimum(-(-(w[:2] + w[2:]) // r), limit))
             for w in windows]
    top = tf.reduce_min(tf.stack([lo for lo, _ in boxes]), axis=0)
    end = tf.reduce_max(tf.stack([hi for _, hi in boxes]), axis=0)
    image = decode(tf.concat([top, end - top], 0), k)        # The union.
    outs = [image[lo[0] - top[0]:hi[0] - top[0], lo[1] - top[1]:hi[1] - top[1]]
            for lo, hi in boxes]
    return outs, windows, shape

  def from_image(image):
    return cut(tf.shape(image),
               lambda u, k: image[u[0]:u[0] + u[2], u[1]:u[1] + u[3]], False)

  def from_jpeg():
    def decode(union, k):
      return tf.switch_case(k, [
          functools.partial(tf.image.decode_and_crop_jpeg, data, union,
                            channels=3, ratio=r) for r in _DCT_RATIOS])
    return cut(tf.io.extract_jpeg_shape(data), decode, fast)

  if form == "jpeg":
    outs, windows, shape = from_jpeg()
  elif form == "encoded":
    outs, windows, shape = tf.cond(
        tf.io.is_jpeg(data), from_jpeg,
        lambda: from_image(tf.io.decode_image(data, channels=3,
                                              expand_animations=False)))
  else:
    outs, windows, shape = from_image(data)
  if flip_seed is not None:
    outs = [tf.image.stateless_random_flip_left_right(o, flip_seed)
            for o in outs]
  hw = tf.cast(tf.stack([shape[0], shape[1], shape[0], shape[1]]), tf.float32)
  return ([fit(o, size, canvas, device_resize, fast) for o in outs],
          [tf.cast(w, tf.float32) / hw for w in windows])
