"""Where the tests' real images come from.

1. $BYOL_JAX_TEST_DATA, if it holds the packs;
2. ../shared/datasets beside the repository ($BYOL_SHARED overrides
   ../shared), as CI has it;
3. otherwise a cache ($BYOL_JAX_TEST_DATA, else ~/.cache/byol_jax/test_data)
   filled once through TFDS with packs of the same layout as
   ../shared/datasets/README.md describes: 6,000 CIFAR-10 images (the first
   500 per class of train, 100 per class of test) and 400 Imagenette images
   (30 per class of train, 10 of validation) re-saved as 224 px JPEGs.

Without the packs and without network, the tests that need images are
skipped with one line saying how to provide them.
"""
import io
import os
import pathlib

import numpy as np
import pytest

PACKS = ("cifar10_small.npz", "imagenette_small.npz")
REPO = pathlib.Path(__file__).resolve().parents[1]
HOW = ("no test images: set BYOL_JAX_TEST_DATA to a folder holding "
       f"{' and '.join(PACKS)} (see ../shared/datasets/README.md), put the "
       "repository beside ../shared/datasets, or run once with network "
       "access so that TFDS can prepare them")


def _has_packs(d: pathlib.Path) -> bool:
  return all((d / p).is_file() for p in PACKS)


def _candidates() -> list[pathlib.Path]:
  out = []
  if os.environ.get("BYOL_JAX_TEST_DATA"):
    out.append(pathlib.Path(os.environ["BYOL_JAX_TEST_DATA"]))
  shared = pathlib.Path(os.environ.get("BYOL_SHARED", REPO.parent / "shared"))
  out.append(shared / "datasets")
  return out


def cache_dir() -> pathlib.Path:
  if os.environ.get("BYOL_JAX_TEST_DATA"):
    return pathlib.Path(os.environ["BYOL_JAX_TEST_DATA"])
  return pathlib.Path.home() / ".cache" / "byol_jax" / "test_data"


def datasets_dir() -> pathlib.Path:
  """The folder with both packs, preparing them if needed, else a skip."""
  for d in _candidates() + [cache_dir()]:
    if _has_packs(d):
      return d
  try:
    prepare(cache_dir())
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"{HOW} ({type(e).__name__} while preparing them)")
  return cache_dir()


def _pack(split_images: dict, class_names) -> dict:
  """{split: [(jpeg bytes, label, name)]} -> the packed .npz arrays."""
  out = {"class_names": np.asarray(class_names)}
  for split, items in split_images.items():
    blobs = [np.frombuffer(b, np.uint8) for b, _, _ in items]
    out[f"{split}_jpeg"] = np.concatenate(blobs)
    out[f"{split}_offsets"] = np.concatenate(
        [[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    out[f"{split}_labels"] = np.asarray([y for _, y, _ in items], np.uint8)
    out[f"{split}_names"] = np.asarray([n for _, _, n in items])
  return out


def _jpeg(image: np.ndarray, size: int | None = None) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(image)
  if size:
    im = im.resize((size, size), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _first_per_class(ds, per_class: int, num_classes: int, size=None):
  counts = np.zeros(num_classes, int)
  items = []
  for i, ex in enumerate(ds):
    y = int(ex["label"])
    if counts[y] < per_class:
      counts[y] += 1
      items.append((_jpeg(ex["image"], size), y, str(i)))
    if counts.min() >= per_class:
      break
  return items


def prepare(target: pathlib.Path) -> None:
  """Downloads CIFAR-10 and Imagenette through TFDS and writes the packs."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from byol_jax import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  target.mkdir(parents=True, exist_ok=True)
  data_dir = target / "tfds"
  for pack, name, splits, size in (
      ("cifar10_small.npz", "cifar10", (("train", 500), ("test", 100)), None),
      ("imagenette_small.npz", "imagenette/320px-v2",
       (("train", 30), ("validation", 10)), 224)):
    if (target / pack).is_file():
      continue
    # The trainer's own preparation: offline, it fails in seconds.
    prepare_lib.ensure_prepared(ml_collections.ConfigDict(dict(
        source="tfds", name=name, data_dir=str(data_dir))))
    builder = tfds.builder(name, data_dir=str(data_dir))
    parts = {}
    for split, n in splits:
      ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
      parts["val" if split == "validation" else split] = _first_per_class(
          ds, n, 10, size)
    names = builder.info.features["label"].names
    np.savez(target / pack, **_pack(parts, names))
