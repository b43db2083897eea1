"""Input pipelines: what a dataset is, and its batches on two paths.

`describe`/`resolve` read and check the dataset's metadata. The builders
return `pipeline.Batches` of global arrays sharded over the mesh's `data`
axis, a pure function of the seed and step, from either the tf.data host
path (`host`, uint8 crops) or the on-device path (`device`, float32 in
[0, 1]; `config.data.on_device`). `augment` holds the device-side
augmentations that the train step applies. TensorFlow is imported only by
`host`, `host_decode` and `tfds_source`: the on-device path with a non-TFDS
source runs without it.
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


def _build(config, mesh, mode, split, batch_size, seed, start_step=0,
           fraction=1.0, arrays=None) -> Batches:
  sharding.check_batch_size(int(batch_size), mesh)
  info.check_source(config, arrays)
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"fraction={fraction} must be in (0, 1].")
  if config.data.on_device:
    path = device
  else:  # TensorFlow is an optional dependency: only the host path needs it.
    from byol_jax.data import host as path  # pylint: disable=g-import-not-at-top
  return path.build(config, mesh, mode, split, int(batch_size), int(seed),
                    start_step, fraction, arrays)


def build_pretrain(config: ml_collections.ConfigDict, mesh: Mesh,
                   start_step: int = 0,
                   arrays: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> Batches:
  """Two-view pretraining batches of the train split, from `start_step` on.

  `batch(step)` -> {'view1', 'view2': [B, S, S, 3], 'label': int32 [B]},
  deterministic in (config.seed, step), so a resumed run gets the batches
  of an uninterrupted one. `arrays` (uint8 images [N, H, W, 3], int32
  labels [N]) replace the source's train split.

  Raises:
    ConfigError: bad source, dataset or split, or a batch size not divisible
      by the number of devices.
  """
  return _build(config, mesh, "pretrain", config.data.train_split,
                config.batch_size, config.seed, start_step, arrays=arrays)


def build_linear_train(config: ml_collections.ConfigDict, mesh: Mesh,
                       batch_size: int, seed: int, start_step: int = 0, *,
                       split: str | None = None,
                       fraction: float = 1.0) -> Batches:
  """Random resized crop + flip batches for linear evaluation and fine-tuning.

  `batch(step)` -> {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32
  [B]}, deterministic in (seed, step). `split` defaults to the train split
  (TFDS slices work); `fraction` < 1 trains on a seeded subset of the split
  (class-balanced for folders, .npz and arrays; uniform for TFDS).
  """
  return _build(config, mesh, "linear", split or config.data.train_split,
                batch_size, seed, start_step, fraction)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh,
               split: str | None, batch_size: int) -> Batches:
  """One pass over `split` per iteration, centre-cropped, padded and masked.

  Each iteration yields {'image': f32 [B, S, S, 3] in [0, 1], 'label':
  int32 [B], 'mask': bool [B]}; every example has mask True in exactly one
  batch, padding rows have label -1. Build it once: every pass reuses the
  compiled functions (and, on the device path, the decoded images).
  `split` None or '' means `describe(config).eval_split`.
  """
  if not split:
    split = describe(config).eval_split
    if split is None:
      raise ConfigError("The dataset has no val, validation or test split; "
                        "set --config.data.eval_split.")
  return _build(config, mesh, "eval", split, batch_size, config.seed)
