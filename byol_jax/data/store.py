"""Whole splits decoded into host memory (PIL; TFDS only for 'tfds' sources).

`load_canvas` (for the on-device path): images of mixed sizes shrunk to
shorter side ceil(image_size / eval_crop_fraction) and cut to at most 2:1,
on one zero-padded canvas. Results are cached and read-only.
"""
import dataclasses
import functools
import math
from typing import Any

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from byol_jax.data import sources
from byol_jax.errors import ConfigError

_MAX_ASPECT = 2.0
# The fields of config.data that decoding reads, with their defaults.
_FIELDS = dict(source="", path="", name="", data_dir="", train_split="train",
               skip_corrupt=True)


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity.
class Canvas:
  """A split on a padded canvas: uint8 `images` [N, Hc, Wc, 3] (image i
  fills [:h_i, :w_i]), int32 `sizes` [N, 2] (h_i, w_i), int32 `labels`."""
  images: np.ndarray
  sizes: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


def _readonly(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
  for x in xs:
    x.flags.writeable = False
  return xs


def _key(data_cfg: Any) -> ml_collections.FrozenConfigDict:
  """The fields of `config.data` that `_decode_split` reads (hashable)."""
  return ml_collections.FrozenConfigDict(
      {k: type(v)(data_cfg.get(k, v)) for k, v in _FIELDS.items()})


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

  def one(i):
    try:
      return s.read(i)
    except (OSError, ValueError, SyntaxError):
      return None
  images = sources.map_threads(one, range(s.num_examples),
                               f"decoding {s.name}", "images")
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
  ch, cw = min(h, int(_MAX_ASPECT * w)), min(w, int(_MAX_ASPECT * h))
  y0, x0 = (h - ch) // 2, (w - cw) // 2
  image, h, w = image[y0:y0 + ch, x0:x0 + cw], ch, cw
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


def _uniform(images) -> np.ndarray | None:
  """The images as one array if they share one size, else None."""
  if isinstance(images, np.ndarray):
    return images
  return np.stack(images) if len({im.shape for im in images}) == 1 else None


def _pack(images, labels, image_size: int, fraction: float) -> Canvas:
  """Images (one array, or a list of any sizes) onto one padded canvas."""
  labels = np.asarray(labels, np.int32)
  if (stacked := _uniform(images)) is not None:
    sizes = np.tile(np.asarray(stacked.shape[1:3], np.int32),
                    (stacked.shape[0], 1))
    return Canvas(*_readonly(stacked, sizes, labels))
  shorter = math.ceil(image_size / fraction)
  images = sources.map_threads(lambda im: fit_within(im, shorter), images,
                               f"shrinking images to {shorter} px", "images")
  sizes = np.asarray([im.shape[:2] for im in images], np.int32)     # [N, 2]
  canvas = np.zeros((len(images), *sizes.max(axis=0), 3), np.uint8)
  for i, im in enumerate(images):
    canvas[i, :im.shape[0], :im.shape[1]] = im
  return Canvas(*_readonly(canvas, sizes, labels))


@functools.lru_cache(maxsize=4)
def _canvas(key, split: str, image_size: int, fraction: float) -> Canvas:
  return _pack(*_decode_split(key, split), image_size, fraction)


def load_canvas(data_cfg: Any, split: str, arrays=None) -> Canvas:
  """A whole split (or `arrays`: uint8 images [N, H, W, 3], labels [N]) on a
  padded canvas, for the on-device path (cached, except for `arrays`)."""
  size = int(data_cfg.image_size)
  fraction = float(data_cfg.get("eval_crop_fraction", 0.875))
  if arrays is not None:
    return _pack(*_decode_split(data_cfg, split, arrays), size, fraction)
  return _canvas(_key(data_cfg), split, size, fraction)


@functools.lru_cache(maxsize=4)
def _arrays(key, split: str, size: int | None, image_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _decode_split(key, split)
  stacked = _uniform(images) if size is None else None
  if stacked is None:
    target = int(size or image_size)
    stacked = np.stack(sources.map_threads(
        lambda im: resize_shorter_center(im, target), images,
        f"resizing images to {target} px", "images"))
  return _readonly(stacked, np.asarray(labels, np.int32))


def load_arrays(data_cfg: Any, split: str, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as uint8 images [N, H, W, 3] and int32 labels [N]: mixed
  sizes, or any if `size` is set, resized and centre-cropped to `size`."""
  return _arrays(_key(data_cfg), split, size,
                 int(data_cfg.get("image_size", 224)))
