"""Index-addressable sources without TensorFlow: image folders, .npz, arrays.

- folder: ROOT/<split>/<class>/*.{jpg,jpeg,png} (any case); images directly
  in ROOT/<split>/ get label -1; classes: the sorted union over all splits.
- npz: `{split}_jpeg` (concatenated bytes), `{split}_offsets` (int64
  [n+1]) or `{split}_images` (uint8 [N, H, W, 3]; `images` for train),
  `{split}_labels` (`labels`), optional `class_names`.
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


def map_threads(fn: Callable, items: Sequence, what: str, unit: str) -> list:
  """list(map(fn, items)) on a thread pool, with progress lines."""
  with concurrent.futures.ThreadPoolExecutor(_NUM_THREADS) as pool:
    return list(progress.track(pool.map(fn, items), what, len(items), unit))


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: int32 labels [N] (-1: unknown) and one of `paths`, `encoded`
  (bytes) or `images` (uint8 [N, H, W, 3]); `all_jpeg`: only JPEGs."""
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


def subdirs(path: str, images: bool = False) -> list[str]:
  """Sorted names of the visible subfolders (or image files) of `path`."""
  with os.scandir(path) as it:
    return sorted(e.name for e in it if not e.name.startswith(".") and (
        e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        if images else e.is_dir()))


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
  """(paths sorted by class then name, int32 labels [N], class names)."""
  check_folder(root)
  splits = subdirs(root)
  split_dir = os.path.join(root, split)
  if split not in splits:
    raise split_not_found(split, f"image folder {root}", splits)
  class_names = folder_classes(root)
  index = {c: i for i, c in enumerate(class_names)}
  paths = [os.path.join(split_dir, n) for n in subdirs(split_dir, True)]
  labels = [-1] * len(paths)
  for cls in subdirs(split_dir):
    names = subdirs(os.path.join(split_dir, cls), True)
    paths += [os.path.join(split_dir, cls, n) for n in names]
    labels += [index[cls]] * len(names)
  if not paths:
    raise ConfigError(
        f"No {'/'.join(IMAGE_EXTENSIONS)} images in {split_dir}; put them in "
        f"{split_dir}/<class>/ (or directly there, unlabelled).")
  return tuple(paths), np.asarray(labels, np.int32), class_names


def file_kind(path: str) -> str | None:
  """'jpeg', 'png', 'gif', 'bmp', or None for an empty, non-image or
  truncated file (from its magic bytes and end-of-image marker)."""
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
  """An image-folder split without its corrupt files (cached per process)."""
  paths, labels, class_names = list_folder(root, split)
  where = os.path.join(root, split)
  kinds = map_threads(file_kind, paths, f"checking the files of {where}",
                      "files")
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
  """A split of an .npz, packed JPEGs or uint8 arrays (cached)."""
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
      images = _rgb(d[key], f"{path}:{key}")
      n = images.shape[0]
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


def _rgb(images: np.ndarray, where: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ConfigError(f"{where} must be uint8 [N, H, W, 3], got {images.dtype}"
                      f" {images.shape}; convert the images to uint8 RGB.")
  return images


def arrays_split(images: np.ndarray, labels: np.ndarray | None) -> Split:
  """A split from in-memory uint8 [N, H, W, 3] images and labels."""
  images = _rgb(images, "Image arrays")
  labels = (np.full((images.shape[0],), -1, np.int32) if labels is None
            else np.asarray(labels, np.int32))
  return Split(labels=labels, images=images, name="arrays")


def get_split(data_cfg: Any, split: str, arrays=None) -> Split:
  """The split of a 'folder', 'npz' or 'arrays' source, or `arrays`."""
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
