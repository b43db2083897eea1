"""What a dataset is, read from metadata only and checked against the config.

`data.eval_split = ""` is the first of val, validation, test that exists;
`data.num_classes = -1` comes from the data (0 when unlabelled), 0 turns
labels off, N > 0 must agree with the data.
"""
import dataclasses
import functools
import os
from typing import Callable

import ml_collections
import numpy as np

from byol_jax.data import sources
from byol_jax.errors import ConfigError

SOURCES = ("tfds", "folder", "npz", "arrays")
EVAL_SPLITS = ("val", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """A dataset as the run sees it (`eval_split` None if there is none)."""
  name: str
  source: str
  train_split: str
  eval_split: str | None
  num_train: int
  num_eval: int
  num_classes: int
  class_names: tuple[str, ...]


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


def _catalog(d: ml_collections.ConfigDict) -> tuple[
    str, list[str], Callable[[str, str], int], tuple[str, ...] | None]:
  """(name, split names, size(split, config field), class names or None for
  an .npz without them)."""
  if d.source == "tfds":
    # TensorFlow is an optional dependency, imported only for TFDS sources.
    from byol_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    b = tfds_source.builder(d)
    return (str(d.name), sorted(b.info.splits),
            lambda s, f: tfds_source.split_size(b, s, f),
            tfds_source.class_names(b))
  path, train = str(d.path), str(d.train_split)
  if d.source == "folder":
    sources.check_folder(path)
    return (path, sources.subdirs(path),
            lambda s, f: len(sources.list_folder(path, s)[0]),
            sources.folder_classes(path))
  sources.check_npz(path)
  with np.load(path, allow_pickle=False) as z:
    files = list(z.files)
    names = (tuple(str(c) for c in z["class_names"])
             if "class_names" in files else ())
  return (path, sources.npz_splits(files, train),
          lambda s, f: sources.npz_split(path, s, train).num_examples,
          names or None)


def _base(split: str) -> str:
  return split.split("[")[0].split("+")[0].strip()


def describe(config: ml_collections.ConfigDict) -> DataInfo:
  """The dataset's `DataInfo`, checked against the config."""
  check_source(config)
  d = config.data
  name, splits, size, names = _catalog(d)
  where = f"TFDS dataset {name!r}" if d.source == "tfds" else name
  train = str(d.train_split)
  if _base(train) not in splits:
    raise sources.split_not_found(train, where, splits, "train_split")
  eval_split = str(d.get("eval_split", "") or "") or None
  if eval_split is None:
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
  elif _base(eval_split) not in splits:
    raise sources.split_not_found(
        eval_split, where, splits,
        "eval_split (or '' to use the first of val, validation, test)")
  info = functools.partial(
      DataInfo, name, d.source, train, eval_split, size(train, "train_split"),
      size(eval_split, "eval_split") if eval_split else 0)
  asked = int(d.get("num_classes", -1))
  if asked == 0:
    return info(0, ())
  found = len(names) if names is not None else None
  if found is None:          # An .npz without class names: labels 0..max.
    top = max(int(sources.npz_split(name, s, train).labels.max(initial=-1))
              for s in [train] + ([eval_split] if eval_split else []))
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
  return info(found, names if found and names else ())


def resolve(config: ml_collections.ConfigDict,
            data_info: DataInfo | None = None) -> ml_collections.ConfigDict:
  """A copy of the config with num_classes, eval_split ("" for none) and, for
  folders and files, data.name (e.g. 'imagewoof2-320') set from the data."""
  data_info = data_info or describe(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.num_classes = int(data_info.num_classes)
    config.data.eval_split = data_info.eval_split or ""
    if config.data.source in ("folder", "npz") and config.data.path:
      base = os.path.basename(os.path.normpath(str(config.data.path)))
      config.data.name = (base[:-4] if base.lower().endswith(".npz")
                          else base)
  return config
