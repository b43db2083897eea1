"""Index-addressable sources without TensorFlow: image folders, .npz, arrays.

A `Split` is held whole by every process: the file paths of an image folder,
the encoded images of a packed .npz, or decoded uint8 arrays. The tf.data
pipeline (`host.py`) reads it by index; the on-device path decodes it with
PIL (`store.py`). TFDS sources live in `tfds_source.py`.

Layouts:
- folder: ROOT/<split>/<class>/*.{jpg,jpeg,png} (any case); images directly
  in ROOT/<split>/ get label -1. Class indices come from the sorted union of
  class folder names over all splits, so that train and eval agree.
- npz (the packed format of ../shared/datasets): `{split}_jpeg` (uint8 bytes,
  concatenated), `{split}_offsets` (int64 [n+1]), `{split}_labels`, and
  optionally `class_names`.
- arrays: an .npz with `{split}_images` (uint8 [N, H, W, 3]) and
  `{split}_labels`, or `images`/`labels` as the train split.
"""
import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from byol_jax import progress
from byol_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_MAGIC = b"\xff\xd8\xff"
_TAIL_BYTES = 4096  # Where the end-of-image marker must be found.
_NUM_THREADS = 16   # File checks and PIL decoding release the GIL.


def split_not_found(split: str, where: str, existing: Sequence[str],
                    field: str = "train_split / eval_split") -> ConfigError:
  """The one error line for a split that does not exist."""
  return ConfigError(
      f"Split {split!r} not found in {where} (splits: "
      f"{', '.join(existing) or 'none'}); set --config.data.{field} to one "
      "of them.")


def decode_image(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 [H, W, 3] with PIL (raises on corrupt data)."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def map_threads(fn: Callable, items) -> list:
  """list(map(fn, items)) on a thread pool (for I/O and PIL work)."""
  with concurrent.futures.ThreadPoolExecutor(_NUM_THREADS) as pool:
    return list(pool.map(fn, items, chunksize=64))


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of an index-addressable source.

  Exactly one of `paths`, `encoded` and `images` is set.

  Attributes:
    labels: int32 [N], -1 where unknown.
    paths: image files (folder source).
    encoded: encoded JPEG/PNG bytes (npz source).
    images: uint8 [N, H, W, 3] (arrays).
    class_names: class names, if known.
    num_skipped: corrupt files left out.
    name: a description for messages.
    all_jpeg: every encoded image is a JPEG (no format check per image).
  """
  labels: np.ndarray
  paths: Sequence[str] | None = None
  encoded: Sequence[bytes] | None = None
  images: np.ndarray | None = None
  class_names: tuple[str, ...] = ()
  num_skipped: int = 0
  name: str = ""
  all_jpeg: bool = False

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  def read(self, i: int) -> np.ndarray:
    """Decodes example i to uint8 [H, W, 3] with PIL (raises on corrupt)."""
    if self.images is not None:
      return self.images[i]
    if self.encoded is not None:
      return decode_image(self.encoded[i])
    with open(self.paths[i], "rb") as f:
      return decode_image(f.read())


# ---------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def subdirs(path: str) -> list[str]:
  """Sorted names of the visible subfolders of `path`."""
  with os.scandir(path) as it:
    return sorted(e.name for e in it
                  if e.is_dir() and not e.name.startswith("."))


def _images_in(path: str) -> list[str]:
  with os.scandir(path) as it:
    return sorted(e.name for e in it if e.is_file() and _is_image(e.name))


def check_folder(root: str) -> None:
  """Raises a ConfigError unless `root` is a folder."""
  if not root or not os.path.isdir(root):
    raise ConfigError(
        f"Image folder config.data.path={root!r} does not exist; set "
        "--config.data.path to a ROOT holding ROOT/<split>/<class>/*.jpg.")


def folder_classes(root: str) -> tuple[str, ...]:
  """Sorted union of the class folder names over all splits of `root`."""
  return tuple(sorted({c for s in subdirs(root)
                       for c in subdirs(os.path.join(root, s))}))


@functools.lru_cache(maxsize=16)
def list_folder(root: str, split: str
                ) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
  """Lists ROOT/<split>/<class>/*.{jpg,jpeg,png} and ROOT/<split>/* (cached).

  Args:
    root: the folder root (config.data.path).
    split: a subfolder of root.

  Returns:
    (paths sorted by class then name, int32 labels [N] (-1 for images
    directly under the split folder), class names).

  Raises:
    ConfigError: missing root, missing split or no images.
  """
  check_folder(root)
  splits = subdirs(root)
  split_dir = os.path.join(root, split)
  if split not in splits:
    raise split_not_found(split, f"image folder {root}", splits)
  class_names = folder_classes(root)
  index = {c: i for i, c in enumerate(class_names)}
  paths = [os.path.join(split_dir, n) for n in _images_in(split_dir)]
  labels = [-1] * len(paths)
  for cls in subdirs(split_dir):
    names = _images_in(os.path.join(split_dir, cls))
    paths += [os.path.join(split_dir, cls, n) for n in names]
    labels += [index[cls]] * len(names)
  if not paths:
    raise ConfigError(
        f"No {'/'.join(IMAGE_EXTENSIONS)} images in {split_dir}; put them in "
        f"{split_dir}/<class>/ (or directly there, unlabelled).")
  return tuple(paths), np.asarray(labels, np.int32), class_names


def file_kind(path: str) -> str | None:
  """Cheap check of an image file: magic bytes and end-of-image marker.

  Reads 16 bytes at the start and at most 4 KiB at the end: catches empty,
  non-image and truncated JPEG/PNG files without decoding them.

  Returns:
    'jpeg', 'png', 'gif' or 'bmp'; None for a file that is not valid.
  """
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - _TAIL_BYTES))
      tail = f.read()
  except OSError:
    return None
  if head.startswith(JPEG_MAGIC):
    return "jpeg" if b"\xff\xd9" in tail else None        # EOI marker.
  if head.startswith(b"\x89PNG\r\n\x1a\n"):
    return "png" if b"IEND" in tail else None               # IEND chunk.
  if head[:6] in (b"GIF87a", b"GIF89a"):
    return "gif"
  return "bmp" if head[:2] == b"BM" else None


@functools.lru_cache(maxsize=8)
def folder_split(root: str, split: str, skip_corrupt: bool = True) -> Split:
  """An image-folder split with corrupt files left out (cached per process).

  Raises:
    ConfigError: a corrupt file when `skip_corrupt` is False, or no valid one.
  """
  paths, labels, class_names = list_folder(root, split)
  where = os.path.join(root, split)
  ticker = progress.Ticker(f"checking the files of {where}", len(paths),
                           "files")

  def kind(path):
    try:
      return file_kind(path)
    finally:
      ticker.add()
  kinds = map_threads(kind, paths)
  ticker.finish()
  ok = np.asarray([k is not None for k in kinds], bool)
  bad = [p for p, k in zip(paths, ok) if not k]
  if bad:
    if not skip_corrupt:
      raise ConfigError(
          f"{len(bad)} corrupt image file(s) in {where}, e.g. {bad[0]}; "
          "remove them or set config.data.skip_corrupt=True to skip them.")
    logging.warning("Skipping %d corrupt image file(s) of %d in %s, e.g. %s.",
                    len(bad), len(paths), where, bad[:3])
  if not ok.any():
    raise ConfigError(f"Every image in {where} is corrupt; check the files.")
  return Split(labels=labels[ok],
               paths=tuple(p for p, k in zip(paths, ok) if k),
               class_names=class_names, num_skipped=len(bad), name=where,
               all_jpeg=all(k in ("jpeg", None) for k in kinds))


# ---------------------------------------------------------------------------
# .npz files (packed JPEGs or arrays) and in-memory arrays.
# ---------------------------------------------------------------------------


def check_npz(path: str) -> None:
  """Raises a ConfigError unless `path` is a file."""
  if not path or not os.path.isfile(path):
    raise ConfigError(
        f"config.data.path={path!r} is not a file; point it at the .npz.")


def npz_splits(files: Sequence[str], train_split: str = "train") -> list[str]:
  """The split names of an .npz with keys `files`."""
  names = {k[:-len(s)] for k in files for s in ("_jpeg", "_images")
           if k.endswith(s)}
  if "images" in files:
    names.add(train_split)
  return sorted(names)


@functools.lru_cache(maxsize=8)
def npz_split(path: str, split: str, train_split: str = "train") -> Split:
  """A split of an .npz: packed JPEG bytes or uint8 arrays (cached).

  Args:
    path: the .npz file.
    split: split name (`{split}_jpeg` or `{split}_images` keys).
    train_split: the split that plain `images`/`labels` keys stand for.

  Raises:
    ConfigError: missing file or split, or arrays that are not uint8 RGB.
  """
  check_npz(path)
  with np.load(path, allow_pickle=False) as d:
    files = set(d.files)
    if split not in npz_splits(files, train_split):
      raise split_not_found(split, path, npz_splits(files, train_split))
    labels_key = f"{split}_labels"
    encoded = images = None
    if f"{split}_jpeg" in files:
      data, off = d[f"{split}_jpeg"], d[f"{split}_offsets"]
      encoded = tuple(data[off[i]:off[i + 1]].tobytes()
                      for i in range(len(off) - 1))
      n = len(encoded)
    else:
      key = f"{split}_images" if f"{split}_images" in files else "images"
      labels_key = labels_key if key != "images" else "labels"
      images = d[key]
      n = images.shape[0]
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(
            f"{path}:{key} must be uint8 [N, H, W, 3], got {images.dtype} "
            f"{images.shape}; convert the images to uint8 RGB.")
    labels = (d[labels_key].astype(np.int32) if labels_key in files
              else np.full((n,), -1, np.int32))
    class_names = (tuple(str(c) for c in d["class_names"])
                   if "class_names" in files else ())
  if n == 0:
    raise ConfigError(f"Split {split!r} of {path} is empty.")
  return Split(labels=labels, encoded=encoded, images=images,
               class_names=class_names, name=f"{path}:{split}",
               all_jpeg=encoded is not None and all(
                   b.startswith(JPEG_MAGIC) for b in encoded))


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
  """The split of a 'folder', 'npz' or 'arrays' source.

  Args:
    data_cfg: `config.data` (source, path, train_split, skip_corrupt).
    split: split name.
    arrays: optional (images, labels), which stand for any split.
  """
  if arrays is not None:
    return arrays_split(*arrays)
  source = data_cfg.source
  if source == "folder":
    return folder_split(str(data_cfg.path), split,
                        bool(data_cfg.get("skip_corrupt", True)))
  if source in ("npz", "arrays"):
    return npz_split(str(data_cfg.path), split,
                     str(data_cfg.get("train_split", "train")))
  raise ConfigError(f"config.data.source={source!r} is not one of 'tfds', "
                    "'folder', 'npz', 'arrays'.")
