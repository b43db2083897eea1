"""Data sources that need no TensorFlow: image folders, packed .npz, arrays.

A `Split` is index-addressable and held whole by every process: the file
paths of an image folder, the encoded images of a packed .npz, or decoded
uint8 arrays. The tf.data pipeline (`host.py`) reads it by index; the
on-device path and the evaluators load it as arrays with PIL
(`load_arrays`, `load_eval_arrays`). TFDS sources live in `host.py`.

Layouts:
- folder: ROOT/<split>/<class>/*.{jpg,jpeg,png} (any case); images directly
  in ROOT/<split>/ get label -1. Class indices come from the sorted union of
  class folder names over all splits, so that train and eval agree.
- npz (the packed format of ../shared/datasets): `{split}_jpeg` (uint8 bytes,
  concatenated), `{split}_offsets` (int64 [n+1]), `{split}_labels`.
- arrays: an .npz with `{split}_images` (uint8 [N, H, W, 3]) and
  `{split}_labels`, or `images`/`labels` as the train split.
"""
import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from byol_jax.data import crops
from byol_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TAIL_BYTES = 4096  # Where the end-of-image marker must be found.
_NUM_THREADS = 16


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of an index-addressable source (all processes hold all of it).

  Exactly one of `paths`, `encoded` and `images` is set.

  Attributes:
    labels: int32 [N], -1 where unknown.
    paths: image files (folder source).
    encoded: encoded JPEG/PNG bytes (npz source).
    images: uint8 [N, H, W, 3] (arrays).
    class_names: class names, if known.
    num_skipped: corrupt files left out.
    name: a description for messages.
  """
  labels: np.ndarray
  paths: Sequence[str] | None = None
  encoded: Sequence[bytes] | None = None
  images: np.ndarray | None = None
  class_names: tuple[str, ...] = ()
  num_skipped: int = 0
  name: str = ""

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  def read(self, i: int) -> np.ndarray:
    """Decodes example i to uint8 [H, W, 3] with PIL (raises on corrupt)."""
    if self.images is not None:
      return self.images[i]
    if self.encoded is not None:
      return crops.decode_image(self.encoded[i])
    with open(self.paths[i], "rb") as f:
      return crops.decode_image(f.read())


def shard_indices(n: int, process_index: int, process_count: int
                  ) -> np.ndarray:
  """This process's examples of a finite split: i = process_index (mod count)."""
  return np.arange(process_index, n, process_count, dtype=np.int64)


# ---------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  with os.scandir(path) as it:
    return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images_in(path: str) -> list[str]:
  with os.scandir(path) as it:
    return sorted(e.name for e in it
                  if e.is_file() and _is_image(e.name) and
                  not e.name.startswith("."))


def list_folder(root: str, split: str
                ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Lists ROOT/<split>/<class>/*.{jpg,jpeg,png} and ROOT/<split>/*.

  Args:
    root: the folder root (config.data.path).
    split: a subfolder of root.

  Returns:
    (paths sorted by class then name, int32 labels [N] (-1 for images
    directly under the split folder), class names).

  Raises:
    ConfigError: missing root, missing split or no images.
  """
  if not root or not os.path.isdir(root):
    raise ConfigError(
        f"Image folder config.data.path={root!r} does not exist; set "
        "--config.data.path to a ROOT holding ROOT/<split>/<class>/*.jpg.")
  splits = _subdirs(root)
  split_dir = os.path.join(root, split)
  if split not in splits:
    raise ConfigError(
        f"Split {split!r} not found in image folder {root} (splits found: "
        f"{', '.join(splits) or 'none'}); set config.data.train_split / "
        "eval_split to one of them.")
  # Class indices from the union over splits: train and eval must agree.
  class_names = tuple(sorted({c for s in splits
                              for c in _subdirs(os.path.join(root, s))}))
  index = {c: i for i, c in enumerate(class_names)}
  paths, labels = [], []
  for name in _images_in(split_dir):
    paths.append(os.path.join(split_dir, name))
    labels.append(-1)
  for cls in _subdirs(split_dir):
    cls_dir = os.path.join(split_dir, cls)
    for name in _images_in(cls_dir):
      paths.append(os.path.join(cls_dir, name))
      labels.append(index[cls])
  if not paths:
    raise ConfigError(
        f"No {'/'.join(IMAGE_EXTENSIONS)} images in {split_dir}; put them in "
        f"{split_dir}/<class>/ (or directly there, unlabelled).")
  return paths, np.asarray(labels, np.int32), class_names


def file_looks_valid(path: str) -> bool:
  """Cheap check of an image file: magic bytes and end-of-image marker.

  Reads 16 bytes at the start and at most 4 KiB at the end: catches empty,
  non-image and truncated JPEG/PNG files without decoding them.
  """
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - _TAIL_BYTES))
      tail = f.read()
  except OSError:
    return False
  if head.startswith(b"\xff\xd8\xff"):                     # JPEG: EOI marker.
    return b"\xff\xd9" in tail
  if head.startswith(b"\x89PNG\r\n\x1a\n"):                # PNG: IEND chunk.
    return b"IEND" in tail
  return head[:6] in (b"GIF87a", b"GIF89a") or head[:2] == b"BM"


def _map_threads(fn, items):
  with concurrent.futures.ThreadPoolExecutor(_NUM_THREADS) as pool:
    return list(pool.map(fn, items, chunksize=64))


def drop_corrupt(paths: Sequence[str], labels: np.ndarray, skip_corrupt: bool,
                 where: str, check=file_looks_valid
                 ) -> tuple[list[str], np.ndarray, int]:
  """Leaves out files that fail `check`, logging how many.

  Raises:
    ConfigError: a corrupt file when `skip_corrupt` is False.
  """
  ok = np.asarray(_map_threads(check, paths), bool)
  bad = [p for p, k in zip(paths, ok) if not k]
  if bad:
    if not skip_corrupt:
      raise ConfigError(
          f"{len(bad)} corrupt image file(s) in {where}, e.g. {bad[0]}; "
          "remove them or set config.data.skip_corrupt=True to skip them.")
    logging.warning("Skipping %d corrupt image file(s) of %d in %s, e.g. %s.",
                    len(bad), len(paths), where, bad[:3])
  return [p for p, k in zip(paths, ok) if k], labels[ok], len(bad)


@functools.lru_cache(maxsize=8)
def folder_split(root: str, split: str, skip_corrupt: bool = True) -> Split:
  """An image-folder split with corrupt files checked (cached per process)."""
  paths, labels, class_names = list_folder(root, split)
  where = os.path.join(root, split)
  paths, labels, skipped = drop_corrupt(paths, labels, skip_corrupt, where)
  if not paths:
    raise ConfigError(f"Every image in {where} is corrupt; check the files.")
  return Split(labels=labels, paths=tuple(paths), class_names=class_names,
               num_skipped=skipped, name=where)


# ---------------------------------------------------------------------------
# .npz files (packed JPEGs or arrays).
# ---------------------------------------------------------------------------


def _npz_splits(files: Sequence[str]) -> list[str]:
  names = set()
  for k in files:
    for suffix in ("_jpeg", "_images"):
      if k.endswith(suffix):
        names.add(k[:-len(suffix)])
  if "images" in files:
    names.add("(images)")
  return sorted(names)


@functools.lru_cache(maxsize=8)
def npz_split(path: str, split: str, train_split: str = "train") -> Split:
  """A split of an .npz: packed JPEG bytes or uint8 arrays (cached).

  Args:
    path: the .npz file.
    split: split name (`{split}_jpeg` or `{split}_images` keys).
    train_split: the split that plain `images`/`labels` keys stand for.

  Raises:
    ConfigError: missing file or split.
  """
  if not path or not os.path.isfile(path):
    raise ConfigError(
        f"config.data.path={path!r} is not a file; point it at the .npz.")
  with np.load(path, allow_pickle=False) as d:
    files = set(d.files)
    labels_key = f"{split}_labels"
    if f"{split}_jpeg" in files:
      data = d[f"{split}_jpeg"]
      off = d[f"{split}_offsets"]
      encoded = tuple(data[off[i]:off[i + 1]].tobytes()
                      for i in range(len(off) - 1))
      images = None
      n = len(encoded)
    elif f"{split}_images" in files or ("images" in files and
                                        split == train_split):
      key = f"{split}_images" if f"{split}_images" in files else "images"
      labels_key = labels_key if key != "images" else "labels"
      images = d[key]
      encoded = None
      n = images.shape[0]
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(
            f"{path}:{key} must be uint8 [N, H, W, 3], got {images.dtype} "
            f"{images.shape}; convert the images to uint8 RGB.")
    else:
      raise ConfigError(
          f"Split {split!r} not found in {path} (splits: "
          f"{', '.join(_npz_splits(files)) or 'none'}); set "
          "config.data.train_split / eval_split to one of them.")
    labels = (d[labels_key].astype(np.int32) if labels_key in files
              else np.full((n,), -1, np.int32))
    class_names = (tuple(str(c) for c in d["class_names"])
                   if "class_names" in files else ())
  if n == 0:
    raise ConfigError(f"Split {split!r} of {path} is empty.")
  return Split(labels=labels, encoded=encoded, images=images,
               class_names=class_names, name=f"{path}:{split}")


def arrays_split(images: np.ndarray, labels: np.ndarray | None) -> Split:
  """A split from in-memory uint8 [N, H, W, 3] images and labels."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ConfigError(f"Image arrays must be uint8 [N, H, W, 3], got "
                      f"{images.dtype} {images.shape}.")
  labels = (np.full((images.shape[0],), -1, np.int32) if labels is None
            else np.asarray(labels, np.int32))
  return Split(labels=labels, images=images, name="arrays")


def get_split(data_cfg: Any, split: str, arrays=None) -> Split:
  """The index-addressable split of a 'folder', 'npz' or 'arrays' source.

  Args:
    data_cfg: `config.data`.
    split: split name.
    arrays: optional (images, labels) for the 'arrays' source.
  """
  source = data_cfg.source
  if arrays is not None:
    return arrays_split(*arrays)
  if source == "folder":
    return folder_split(data_cfg.path, split, bool(data_cfg.skip_corrupt))
  if source in ("npz", "arrays"):
    return npz_split(data_cfg.path, split, data_cfg.train_split)
  raise ConfigError(f"config.data.source={source!r} is not one of 'tfds', "
                    "'folder', 'npz', 'arrays'.")


# ---------------------------------------------------------------------------
# Whole splits as arrays (TF-free, with PIL).
# ---------------------------------------------------------------------------


def _decode_all(split: Split, fn, skip_corrupt: bool
                ) -> tuple[list[np.ndarray], np.ndarray]:
  """fn(split.read(i)) for every i, leaving out undecodable images."""
  def one(i):
    try:
      return fn(split.read(i))
    except (OSError, ValueError, SyntaxError):
      return None
  out = _map_threads(one, range(split.num_examples))
  ok = np.asarray([o is not None for o in out], bool)
  if not ok.all():
    bad = int((~ok).sum())
    if not skip_corrupt:
      raise ConfigError(
          f"{bad} image(s) of {split.name} cannot be decoded; remove them or "
          "set config.data.skip_corrupt=True.")
    logging.warning("Skipping %d undecodable image(s) of %s.", bad, split.name)
  return [o for o in out if o is not None], split.labels[ok]


def _tfds_arrays(data_cfg: Any, split: str, fn):
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  images, labels = host.tfds_numpy(data_cfg, split)
  return [fn(im) for im in images], labels


@functools.lru_cache(maxsize=4)
def _load_arrays_cached(source, path, name, data_dir, train_split, split,
                        size, skip_corrupt, image_size):
  cfg = _DataCfg(source, path, name, data_dir, train_split, skip_corrupt,
                 image_size)
  if source == "tfds":
    images, labels = _tfds_arrays(cfg, split, lambda im: im)
  else:
    s = get_split(cfg, split)
    if s.images is not None and size is None:
      images, labels = s.images, s.labels
      return _readonly(images), _readonly(labels)
    images, labels = _decode_all(s, lambda im: im, skip_corrupt)
  shapes = {im.shape for im in images}
  if size is None and len(shapes) == 1:
    stacked = np.stack(images)
  else:
    target = int(size or image_size)
    stacked = np.stack(_map_threads(
        lambda im: crops.resize_shorter_center(im, target), images))
  return _readonly(stacked), _readonly(np.asarray(labels, np.int32))


@functools.lru_cache(maxsize=4)
def _load_eval_cached(source, path, name, data_dir, train_split, split,
                      skip_corrupt, image_size, fraction):
  cfg = _DataCfg(source, path, name, data_dir, train_split, skip_corrupt,
                 image_size)
  fn = lambda im: crops.center_crop_resize(im, image_size, fraction)
  if source == "tfds":
    images, labels = _tfds_arrays(cfg, split, fn)
  else:
    s = get_split(cfg, split)
    images, labels = _decode_all(s, fn, skip_corrupt)
  return (_readonly(np.stack(images)),
          _readonly(np.asarray(labels, np.int32)))


@dataclasses.dataclass(frozen=True)
class _DataCfg:
  """The hashable subset of config.data that the loaders read."""
  source: str
  path: str
  name: str
  data_dir: str
  train_split: str
  skip_corrupt: bool
  image_size: int

  def get(self, key: str, default: Any = None) -> Any:
    return getattr(self, key, default)


def _readonly(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  x.flags.writeable = False
  return x


def _key(data_cfg: Any) -> tuple:
  return (str(data_cfg.source), str(data_cfg.get("path", "")),
          str(data_cfg.get("name", "")), str(data_cfg.get("data_dir", "")),
          str(data_cfg.get("train_split", "train")))


def load_arrays(data_cfg: Any, split: str, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as uint8 images [N, H, W, 3] and int32 labels [N].

  For small sets (CIFAR, Imagenette at low resolution). Decodes with PIL
  (no TensorFlow, except for the 'tfds' source). If every image has the
  same size and `size` is None they keep it; otherwise each is resized
  (bicubic) so that its shorter side is `size` (default
  `data_cfg.image_size`) and centre-cropped to a square. Results are cached
  per process and read-only.

  Args:
    data_cfg: `config.data` (source, path, name, data_dir, train_split,
      skip_corrupt, image_size).
    split: split name.
    size: force this square size.

  Returns:
    (images uint8 [N, H, W, 3], labels int32 [N], -1 where unknown).
  """
  return _load_arrays_cached(
      *_key(data_cfg), split, size, bool(data_cfg.get("skip_corrupt", True)),
      int(data_cfg.image_size))


def load_eval_arrays(data_cfg: Any, split: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A split centre-cropped (eval_crop_fraction of the shorter side) and resized.

  Returns:
    (images uint8 [N, S, S, 3], labels int32 [N]), S = data_cfg.image_size.
  """
  return _load_eval_cached(
      *_key(data_cfg), split, bool(data_cfg.get("skip_corrupt", True)),
      int(data_cfg.image_size), float(data_cfg.eval_crop_fraction))
