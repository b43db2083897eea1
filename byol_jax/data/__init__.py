"""Input pipelines: what a dataset is, and its batches on two paths.

- `describe(config)` -> `DataInfo`: names, resolved splits, sizes and
  classes, read from metadata only, with every config mistake one
  `ConfigError` line; `resolve(config)`: the config with those filled in.
- `build_pretrain(config, mesh, start_step)` -> `.batch(step)`:
  {'view1', 'view2': [B, S, S, 3], 'label': int32 [B]}: uint8 crops from
  the tf.data host path, float32 in [0, 1] from the on-device path
  (`config.data.on_device`). `augment.augment_views` finishes them in the
  jitted train step.
- `build_linear_train(config, mesh, batch_size, seed, split=, fraction=)`
  -> `.batch(step)`: {'image': f32 random resized crop + flip, 'label'}.
- `build_eval(config, mesh, split, batch_size)` -> one padded pass per
  iteration: {'image': f32 [B, S, S, 3] centre crops, 'label', 'mask'}.
- `load_arrays(config.data, split)` -> (uint8 [N, H, W, 3], int32 [N]).

All batches are global jax.Arrays sharded over the mesh's `data` axis
(`sharding.batch_sharding(mesh)`), a pure function of the seed and step.
Both paths return the same `pipeline.Batches`. Modules: `sources` (folders,
.npz, arrays), `tfds_source`, `info`, `order` (which examples each step
reads), `crops` (crop geometry for both paths; resampling on device),
`store` (decoded splits), `host` and `host_decode` (tf.data), `device`,
`pipeline`, `augment` (the device-side augmentations, uint8 -> float,
normalisation). TensorFlow is imported only by `host`, `host_decode` and
`tfds_source`: the on-device path with a non-TFDS source runs without it.
"""
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.data import device
from byol_jax.data import info
from byol_jax.data.augment import augment_view
from byol_jax.data.augment import augment_views
from byol_jax.data.augment import normalize
from byol_jax.data.augment import to_float
from byol_jax.data.info import DataInfo
from byol_jax.data.info import describe
from byol_jax.data.info import resolve
from byol_jax.data.pipeline import Batches
from byol_jax.data.store import load_arrays
from byol_jax.errors import ConfigError

__all__ = [
    "Batches", "ConfigError", "DataInfo", "augment", "augment_view",
    "augment_views", "build_eval", "build_linear_train", "build_pretrain",
    "describe", "load_arrays", "normalize", "resolve", "to_float",
]

_EVAL, _LINEAR, _PRETRAIN = "eval", "linear", "pretrain"


def _build(config, mesh, mode, split, batch_size, seed, start_step=0,
           fraction=1.0, arrays=None) -> Batches:
  sharding.check_batch_size(int(batch_size), mesh)
  info.check_source(config, arrays)
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"fraction={fraction} must be in (0, 1].")
  if config.data.on_device:
    return device.build(config, mesh, mode, split, int(batch_size), int(seed),
                        start_step, fraction, arrays)
  # TensorFlow is an optional dependency: only the host path imports it.
  from byol_jax.data import host  # pylint: disable=g-import-not-at-top
  return host.build(config, mesh, mode, split, int(batch_size), int(seed),
                    start_step, fraction, arrays)


def build_pretrain(config: ml_collections.ConfigDict, mesh: Mesh,
                   start_step: int = 0,
                   arrays: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> Batches:
  """Two-view pretraining batches of the train split, from `start_step` on.

  `batch(step)` is deterministic in (config.seed, step): resuming at any
  step gives the batches an uninterrupted run would have had. On the host
  path the next batches are prefetched onto the devices.

  Args:
    config: the run's config (seed, batch_size, data.*).
    mesh: the device mesh (global batch split over its `data` axis).
    start_step: the first step that `batch` will be called with.
    arrays: optional (uint8 images [N, H, W, 3], int32 labels [N]) to train
      on instead of the source's train split.

  Returns:
    `Batches` with `num_examples`, `steps_per_epoch` and `batch(step)`.

  Raises:
    ConfigError: bad source, dataset, split, or a batch size not divisible by
      the number of devices.
  """
  return _build(config, mesh, _PRETRAIN, config.data.train_split,
                config.batch_size, config.seed, start_step, arrays=arrays)


def build_linear_train(config: ml_collections.ConfigDict, mesh: Mesh,
                       batch_size: int, seed: int, start_step: int = 0, *,
                       split: str | None = None,
                       fraction: float = 1.0) -> Batches:
  """Random resized crop + flip batches, for linear evaluation and fine-tuning.

  Args:
    config: the run's config (data.*).
    mesh: the device mesh.
    batch_size: global batch.
    seed: the order's and augmentations' seed.
    start_step: the first step `batch` will be called with.
    split: default config.data.train_split (TFDS slices such as
      'train[:10%]' work).
    fraction: train on a seeded subset of this fraction of the split, the
      same for a given seed (class-balanced for folders, .npz and arrays;
      uniform for TFDS). `num_examples` is the subset's size.

  Returns:
    `Batches` with `num_examples`, `steps_per_epoch` and `batch(step)` ->
    {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B]}.
  """
  return _build(config, mesh, _LINEAR, split or config.data.train_split,
                batch_size, seed, start_step, fraction)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh,
               split: str | None, batch_size: int) -> Batches:
  """One pass over `split` per iteration, centre-cropped, padded and masked.

  Every example of the split has mask True in exactly one batch; padding
  rows have mask False and label -1. Build it once: each pass reuses the
  compiled functions (and, on the device path, the decoded images).

  Args:
    config: the run's config (data.*).
    mesh: the device mesh.
    split: the split to read; None or '' for `describe(config).eval_split`.
    batch_size: global batch (a multiple of the number of devices).

  Returns:
    `Batches`: iterable of {'image': f32 [B, S, S, 3] in [0, 1], 'label':
    int32 [B], 'mask': bool [B]}, with `num_examples` and `len()`.
  """
  if not split:
    split = describe(config).eval_split
    if split is None:
      raise ConfigError("The dataset has no val, validation or test split; "
                        "set --config.data.eval_split.")
  return _build(config, mesh, _EVAL, split, batch_size, config.seed)
