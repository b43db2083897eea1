"""What a dataset is, read cheaply and checked against the config.

`describe(config)` reads only metadata (TFDS `builder.info`, folder
listings, .npz keys and labels) and resolves the config's conventions:
`data.eval_split = ""` is the first of val, validation, test that exists;
`data.num_classes = -1` comes from the data (0 when unlabelled), 0 turns
labels off, N > 0 must agree with the data. Each mistake is one
`ConfigError` line.
"""
import dataclasses
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from byol_jax.data import sources
from byol_jax.errors import ConfigError

SOURCES = ("tfds", "folder", "npz", "arrays")
EVAL_SPLITS = ("val", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """A dataset as the run sees it: `name` (TFDS name, folder or .npz path),
  `eval_split` None if there is none (then `num_eval` 0), `num_classes` 0
  when unlabelled or labels are off, `class_names` where the data has them.
  """
  name: str
  source: str
  train_split: str
  eval_split: str | None
  num_train: int
  num_eval: int
  num_classes: int
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Catalog:
  """A source's metadata: split names, sizes and label facts."""
  name: str
  splits: list[str]
  size: Callable[[str, str], int]        # (split, config field) -> count.
  num_classes: int | None                # Known class count, if any.
  class_names: tuple[str, ...]
  max_label: Callable[[list[str]], int]  # Largest label over splits (-1).


def check_source(config: ml_collections.ConfigDict, arrays=None) -> None:
  """Raises a ConfigError for an unknown source or a missing 'arrays' input."""
  source = config.data.source
  if source not in SOURCES:
    raise ConfigError(f"config.data.source={source!r} is not one of "
                      f"{', '.join(SOURCES)}; set --config.data.source.")
  if source == "arrays" and arrays is None and not config.data.path:
    raise ConfigError("config.data.source='arrays' needs config.data.path "
                      "(an .npz with images/labels) or arrays=(images, "
                      "labels).")


def _tfds_catalog(data_cfg: Any) -> _Catalog:
  # TensorFlow is an optional dependency, imported only for TFDS sources.
  from byol_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  b = tfds_source.builder(data_cfg)
  n, names = tfds_source.classes(b)
  return _Catalog(str(data_cfg.name), tfds_source.split_names(b),
                  lambda s, f: tfds_source.split_size(b, s, f),
                  n if n else None, names, lambda splits: -1)


def _folder_catalog(root: str) -> _Catalog:
  sources.check_folder(root)
  names = sources.folder_classes(root)
  return _Catalog(root, sources.subdirs(root),
                  lambda s, f: len(sources.list_folder(root, s)[0]),
                  len(names), names, lambda splits: len(names) - 1)


def _npz_catalog(path: str, train_split: str) -> _Catalog:
  sources.check_npz(path)
  with np.load(path, allow_pickle=False) as d:
    files = list(d.files)
    names = (tuple(str(c) for c in d["class_names"])
             if "class_names" in files else ())
  splits = sources.npz_splits(files, train_split)

  def labels(s):
    return sources.npz_split(path, s, train_split).labels

  def max_label(used):
    return max((int(labels(s).max(initial=-1)) for s in used), default=-1)
  return _Catalog(path, splits, lambda s, f: labels(s).shape[0],
                  len(names) if names else None, names, max_label)


def _catalog(d: ml_collections.ConfigDict) -> _Catalog:
  if d.source == "tfds":
    return _tfds_catalog(d)
  if d.source == "folder":
    return _folder_catalog(str(d.path))
  return _npz_catalog(str(d.path), str(d.train_split))


def _base(split: str) -> str:
  return split.split("[")[0].split("+")[0].strip()


def describe(config: ml_collections.ConfigDict) -> DataInfo:
  """The dataset's `DataInfo`, checked against the config."""
  check_source(config)
  d = config.data
  cat = _catalog(d)
  where = f"TFDS dataset {cat.name!r}" if d.source == "tfds" else cat.name
  train = str(d.train_split)
  exists = lambda s: _base(s) in cat.splits
  if not exists(train):
    raise sources.split_not_found(train, where, cat.splits, "train_split")
  num_train = cat.size(train, "train_split")
  eval_split = str(d.get("eval_split", "") or "") or None
  if eval_split is None:
    eval_split = next((s for s in EVAL_SPLITS if s in cat.splits), None)
  elif not exists(eval_split):
    raise sources.split_not_found(
        eval_split, where, cat.splits,
        "eval_split (or '' to use the first of val, validation, test)")
  num_eval = cat.size(eval_split, "eval_split") if eval_split else 0

  asked = int(d.get("num_classes", -1))
  used = [train] + ([eval_split] if eval_split else [])
  found = cat.num_classes
  if asked == 0:
    return DataInfo(cat.name, d.source, train, eval_split, num_train,
                    num_eval, 0, ())
  if found is None:                      # Only labels: none, or 0..max.
    top = cat.max_label(used)
    if top >= 0 and 0 < asked <= top:
      raise ConfigError(
          f"config.data.num_classes={asked} but {where} has labels up to "
          f"{top}; set --config.data.num_classes to at least {top + 1} (or "
          "-1 to take it from the data).")
    found = 0 if top < 0 else max(asked, top + 1)
  if asked > 0 and found == 0:
    raise ConfigError(
        f"config.data.num_classes={asked} but {where} is unlabelled; set "
        "--config.data.num_classes=-1 (or 0).")
  if asked > 0 and asked != found:
    raise ConfigError(
        f"config.data.num_classes={asked} but {where} has {found} classes; "
        f"set --config.data.num_classes={found} (or -1 to take it from the "
        "data).")
  return DataInfo(cat.name, d.source, train, eval_split, num_train, num_eval,
                  found, cat.class_names if found else ())


def resolve(config: ml_collections.ConfigDict,
            data_info: DataInfo | None = None) -> ml_collections.ConfigDict:
  """A copy of the config with what the data says (`describe`, or
  `data_info`): num_classes >= 0, eval_split ("" for none), and for folders
  and files the name of the data the run read (e.g. 'imagewoof2-320')."""
  data_info = data_info or describe(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.num_classes = int(data_info.num_classes)
    config.data.eval_split = data_info.eval_split or ""
    if config.data.source in ("folder", "npz") and config.data.path:
      config.data.name = dataset_name(str(config.data.path))
  return config


def dataset_name(path: str) -> str:
  """'/data/imagewoof2-320/' -> 'imagewoof2-320'; 'x/cifar.npz' -> 'cifar'."""
  base = os.path.basename(os.path.normpath(path))
  return base[:-4] if base.lower().endswith(".npz") else base
