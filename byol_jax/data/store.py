"""Whole splits decoded into host memory (PIL; TFDS only for 'tfds' sources).

Two forms:
- `load_canvas`: what the on-device path keeps on the accelerators. Every
  image keeps its aspect ratio and sits at the top-left of a zero-padded
  canvas of a fixed size, with its real (h, w) stored beside it, so random
  resized crops on the devices see its full extent (`crops.crop_resize`
  never reads the padding). When all images share one size they are kept
  as they are; otherwise images whose shorter side exceeds
  ceil(image_size / eval_crop_fraction) are shrunk to it (bicubic,
  antialiased), so that the evaluation centre crop needs no enlarging, and
  images longer than 2:1 lose the ends of their longer side (a bound on the
  canvas, and so on memory).
- `load_arrays`: plain uint8 [N, H, W, 3] arrays of one size (for tests and
  notebooks).

Results are cached per process and read-only.
"""
import dataclasses
import functools
import math
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from byol_jax import progress
from byol_jax.data import sources
from byol_jax.errors import ConfigError

_MAX_ASPECT = 2.0


@dataclasses.dataclass(frozen=True)
class Canvas:
  """A split on a padded canvas.

  Attributes:
    images: uint8 [N, Hc, Wc, 3]; image i fills [:h_i, :w_i], zeros after.
    sizes: int32 [N, 2], the real (h_i, w_i).
    labels: int32 [N], -1 where unknown.
  """
  images: np.ndarray
  sizes: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


def _readonly(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  x.flags.writeable = False
  return x


def _decode_split(data_cfg: Any, split: str, arrays=None
                  ) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
  """Every image of a split (uint8 [H, W, 3] each) and int32 labels [N]."""
  if data_cfg.source == "tfds" and arrays is None:
    # TensorFlow is an optional dependency, imported only for TFDS sources.
    from byol_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.decoded_split(data_cfg, split)
  s = sources.get_split(data_cfg, split, arrays)
  if s.images is not None:
    return s.images, s.labels

  ticker = progress.Ticker(f"decoding {s.name}", s.num_examples, "images")

  def one(i):
    try:
      return s.read(i)
    except (OSError, ValueError, SyntaxError):
      return None
    finally:
      ticker.add()
  images = sources.map_threads(one, range(s.num_examples))
  ticker.finish()
  ok = np.asarray([im is not None for im in images], bool)
  if not ok.all():
    bad = int((~ok).sum())
    if not data_cfg.get("skip_corrupt", True):
      raise ConfigError(
          f"{bad} image(s) of {s.name} cannot be decoded; remove them or "
          "set config.data.skip_corrupt=True.")
    logging.warning("Skipping %d undecodable image(s) of %s.", bad, s.name)
  return [im for im in images if im is not None], s.labels[ok]


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def fit_within(image: np.ndarray, shorter: int) -> np.ndarray:
  """Aspect kept: at most 2:1 (centre), shorter side at most `shorter`."""
  h, w = image.shape[:2]
  if h > _MAX_ASPECT * w:
    y0 = (h - int(_MAX_ASPECT * w)) // 2
    image, h = image[y0:y0 + int(_MAX_ASPECT * w)], int(_MAX_ASPECT * w)
  elif w > _MAX_ASPECT * h:
    x0 = (w - int(_MAX_ASPECT * h)) // 2
    image, w = image[:, x0:x0 + int(_MAX_ASPECT * h)], int(_MAX_ASPECT * h)
  s = min(1.0, shorter / min(h, w))
  return _resize(image, max(1, round(h * s)), max(1, round(w * s)))


def resize_shorter_center(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size` (bicubic), then the centred size x size square."""
  h, w = image.shape[:2]
  s = size / min(h, w)
  nh, nw = max(size, round(h * s)), max(size, round(w * s))
  im = _resize(image, nh, nw)
  y0, x0 = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(im[y0:y0 + size, x0:x0 + size])


def _cfg_key(data_cfg: Any) -> tuple:
  return (str(data_cfg.source), str(data_cfg.get("path", "")),
          str(data_cfg.get("name", "")), str(data_cfg.get("data_dir", "")),
          str(data_cfg.get("train_split", "train")),
          bool(data_cfg.get("skip_corrupt", True)))


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """The hashable subset of config.data that the loaders read."""
  source: str
  path: str
  name: str
  data_dir: str
  train_split: str
  skip_corrupt: bool

  def get(self, key: str, default: Any = None) -> Any:
    return getattr(self, key, default)


def canvas_key(data_cfg: Any, split: str) -> tuple:
  """What `load_canvas` depends on (hashable)."""
  return (*_cfg_key(data_cfg), split, int(data_cfg.image_size),
          float(data_cfg.get("eval_crop_fraction", 0.875)))


@functools.lru_cache(maxsize=4)
def canvas_for_key(key: tuple) -> Canvas:
  """`load_canvas` of a `canvas_key` (cached)."""
  *cfg, split, image_size, fraction = key
  images, labels = _decode_split(_Cfg(*cfg), split)
  return _pack(images, labels, image_size, fraction)


def _pack(images, labels, image_size: int, fraction: float) -> Canvas:
  """Images (one array, or a list of any sizes) onto one padded canvas."""
  if isinstance(images, np.ndarray) or len({im.shape for im in images}) == 1:
    stacked = np.stack(images) if not isinstance(images, np.ndarray) else images
    sizes = np.tile(np.asarray(stacked.shape[1:3], np.int32),
                    (stacked.shape[0], 1))
    return Canvas(_readonly(stacked), _readonly(sizes),
                  _readonly(np.asarray(labels, np.int32)))
  shorter = math.ceil(image_size / fraction)
  ticker = progress.Ticker(f"shrinking images to {shorter} px", len(images),
                           "images")

  def fit(im):
    try:
      return fit_within(im, shorter)
    finally:
      ticker.add()
  images = sources.map_threads(fit, images)
  ticker.finish()
  sizes = np.asarray([im.shape[:2] for im in images], np.int32)     # [N, 2]
  canvas = np.zeros((len(images), *sizes.max(axis=0), 3), np.uint8)
  for i, im in enumerate(images):
    canvas[i, :im.shape[0], :im.shape[1]] = im
  return Canvas(_readonly(canvas), _readonly(sizes),
                _readonly(np.asarray(labels, np.int32)))


def load_canvas(data_cfg: Any, split: str, arrays=None) -> Canvas:
  """A whole split on a padded canvas, for the on-device path (cached).

  Args:
    data_cfg: `config.data` (source, path, name, data_dir, train_split,
      skip_corrupt, image_size, eval_crop_fraction).
    split: split name.
    arrays: optional (uint8 images [N, H, W, 3], labels [N]) instead.

  Returns:
    A `Canvas`.
  """
  if arrays is not None:
    return _pack(*_decode_split(data_cfg, split, arrays),
                 int(data_cfg.image_size),
                 float(data_cfg.get("eval_crop_fraction", 0.875)))
  return canvas_for_key(canvas_key(data_cfg, split))


@functools.lru_cache(maxsize=4)
def _arrays_cached(key: tuple, split: str, size: int | None,
                   image_size: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _decode_split(_Cfg(*key), split)
  if isinstance(images, np.ndarray) and size is None:
    return _readonly(images), _readonly(labels)
  if size is None and len({im.shape for im in images}) == 1:
    stacked = np.stack(images)
  else:
    target = int(size or image_size)
    stacked = np.stack(sources.map_threads(
        lambda im: resize_shorter_center(im, target), images))
  return _readonly(stacked), _readonly(np.asarray(labels, np.int32))


def load_arrays(data_cfg: Any, split: str, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as uint8 images [N, H, W, 3] and int32 labels [N].

  For small sets. Decodes with PIL (no TensorFlow, except for the 'tfds'
  source). If every image has the same size and `size` is None they keep
  it; otherwise each is resized (bicubic) so that its shorter side is `size`
  (default `data_cfg.image_size`) and centre-cropped to a square. Cached per
  process; read-only.

  Args:
    data_cfg: `config.data` (source, path; name, data_dir, train_split,
      skip_corrupt, image_size where they apply).
    split: split name.
    size: force this square size.

  Returns:
    (images uint8 [N, H, W, 3], labels int32 [N], -1 where unknown).
  """
  return _arrays_cached(_cfg_key(data_cfg), split, size,
                        int(data_cfg.get("image_size", 224)))
