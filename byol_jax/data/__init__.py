"""Input pipelines: sources, two-view crops, device-side augmentations.

Entry points (all batches are global jax.Arrays sharded over the mesh's
`data` axis with `sharding.batch_sharding(mesh)`):

- `build_pretrain(config, mesh, start_step)` -> `.batch(step)` gives
  {'view1', 'view2': [B, S, S, 3], 'label': int32 [B]}: uint8 crops from the
  tf.data host pipeline, or float32 crops in [0, 1] from the on-device path
  (`config.data.on_device`). `augment.augment_views` finishes them in the
  jitted train step.
- `build_eval(config, mesh, split, batch_size)` -> iterable of one pass:
  {'image': f32 [B, S, S, 3] in [0, 1] centre crops, 'label', 'mask'}.
- `build_linear_train(config, mesh, batch_size, seed)` -> `.batch(step)`:
  {'image': f32 random resized crop + flip, 'label'}.
- `load_arrays(config.data, split)` -> (uint8 [N, H, W, 3], int32 [N]).

Sources (`config.data.source`): 'tfds' (config.data.name, data_dir),
'folder' (config.data.path = ROOT/<split>/<class>/*.jpg), 'npz' (packed JPEGs,
as in ../shared/datasets) and 'arrays' (an .npz of uint8 arrays, or arrays
passed in). TensorFlow is imported only by `host.py`: the on-device path
with a non-TFDS source runs without it.
"""
from typing import Iterator, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax import sharding
from byol_jax.data import augment
from byol_jax.data import crops
from byol_jax.data import device
from byol_jax.data import sources
from byol_jax.data.augment import augment_view
from byol_jax.data.augment import augment_views
from byol_jax.data.augment import normalize
from byol_jax.data.sources import load_arrays
from byol_jax.data.sources import load_eval_arrays
from byol_jax.errors import ConfigError

__all__ = [
    "PretrainData", "EvalData", "LinearTrainData", "augment", "augment_view",
    "augment_views", "normalize", "build_pretrain", "build_eval",
    "build_linear_train", "load_arrays", "load_eval_arrays", "crops",
    "sources", "device",
]

SOURCES = ("tfds", "folder", "npz", "arrays")


class PretrainData(Protocol):
  """What `build_pretrain` returns."""
  num_examples: int
  steps_per_epoch: int

  def batch(self, step: int) -> dict[str, jax.Array]:
    ...


class LinearTrainData(Protocol):
  """What `build_linear_train` returns."""
  num_examples: int
  steps_per_epoch: int

  def batch(self, step: int) -> dict[str, jax.Array]:
    ...


class EvalData(Protocol):
  """What `build_eval` returns: each iteration is one pass over the split."""
  num_examples: int

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    ...


def _check_source(config: ml_collections.ConfigDict, arrays=None):
  source = config.data.source
  if source not in SOURCES:
    raise ConfigError(f"config.data.source={source!r} is not one of "
                      f"{', '.join(SOURCES)}; set --config.data.source.")
  if source == "arrays" and arrays is None and not config.data.path:
    raise ConfigError("config.data.source='arrays' needs config.data.path "
                      "(an .npz with images/labels) or arrays=(images, "
                      "labels).")


def build_pretrain(config: ml_collections.ConfigDict, mesh: Mesh,
                   start_step: int = 0,
                   arrays: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> PretrainData:
  """Two-view pretraining batches, from `start_step` on.

  `batch(step)` is deterministic in (config.seed, step): resuming at any
  step gives the batches an uninterrupted run would have had.

  Args:
    config: the run's config (seed, batch_size, data.*).
    mesh: the device mesh (global batch split over its `data` axis).
    start_step: the first step that `batch` will be called with.
    arrays: optional (uint8 images [N, H, W, 3], int32 labels [N]) to train
      on instead of the source's train split.

  Returns:
    An object with `num_examples`, `steps_per_epoch` and `batch(step)`.

  Raises:
    ConfigError: bad source, dataset, split, or a batch size not divisible by
      the number of devices.
  """
  sharding.check_batch_size(int(config.batch_size), mesh)
  _check_source(config, arrays)
  if config.data.on_device:
    if arrays is not None:
      images, labels = arrays
    else:
      images, labels = load_arrays(config.data, config.data.train_split)
    return device.DevicePretrainData(config, mesh, images, labels,
                                     start_step=start_step)
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  return host.HostPretrainData(config, mesh, start_step=start_step,
                               arrays=arrays)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh, split: str,
               batch_size: int) -> EvalData:
  """One pass over `split` per iteration, centre-cropped, padded and masked.

  Every example of the split has mask True in exactly one batch; padding
  rows have mask False and label -1.

  Args:
    config: the run's config (data.*).
    mesh: the device mesh.
    split: the split to read.
    batch_size: global batch (a multiple of the number of devices).

  Returns:
    An iterable of {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B],
    'mask': bool [B]}, with `num_examples` and `len()` (batches per pass).
  """
  sharding.check_batch_size(int(batch_size), mesh)
  _check_source(config)
  if config.data.on_device:
    images, labels = load_eval_arrays(config.data, split)
    return device.ArrayEvalData(mesh, images, labels, batch_size)
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  return host.HostEvalData(config, mesh, split, batch_size)


def build_linear_train(config: ml_collections.ConfigDict, mesh: Mesh,
                       batch_size: int, seed: int) -> LinearTrainData:
  """Random resized crop + flip batches of the train split, for linear eval.

  Returns:
    An object with `num_examples`, `steps_per_epoch` and `batch(step)` ->
    {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B]}.
  """
  sharding.check_batch_size(int(batch_size), mesh)
  _check_source(config)
  if config.data.on_device:
    images, labels = load_arrays(config.data, config.data.train_split)
    return device.DeviceLinearTrainData(config, mesh, images, labels,
                                        batch_size, seed)
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  return host.HostLinearTrainData(config, mesh, batch_size, seed)


# TEMPORARY (lead's stand-in until the data redesign lands): the resolved
# description of a config's data.
import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DataInfo:
  name: str
  source: str
  train_split: str
  eval_split: str | None
  num_train: int
  num_eval: int
  num_classes: int
  class_names: tuple = ()


def describe(config: ml_collections.ConfigDict) -> DataInfo:
  _check_source(config)
  d = config.data
  if d.source == "tfds":
    from byol_jax.data import host  # pylint: disable=g-import-not-at-top
    b = host.tfds_builder(d)
    n_train = host.tfds_split_size(b, d.train_split)
    n_eval = host.tfds_split_size(b, d.eval_split) if d.eval_split else 0
    return DataInfo(d.name, d.source, d.train_split, d.eval_split or None,
                    n_train, n_eval, int(d.num_classes))
  train = sources.get_split(d, d.train_split)
  ev = sources.get_split(d, d.eval_split) if d.eval_split else None
  num_classes = int(d.num_classes)
  if num_classes < 0:
    num_classes = len(train.class_names) or int(train.labels.max()) + 1
  return DataInfo(d.path, d.source, d.train_split, d.eval_split or None,
                  train.num_examples, ev.num_examples if ev else 0,
                  num_classes)
