"""Input pipelines: what a dataset is (`describe`), and its batches, a pure
function of seed and step, from the tf.data host path (`host`) or the
on-device path (`device`; TensorFlow only for TFDS sources).
"""
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.data import device
from byol_jax.data import info
from byol_jax.data.augment import augment_views
from byol_jax.data.augment import normalize
from byol_jax.data.info import describe
from byol_jax.data.info import resolve
from byol_jax.data.pipeline import Batches
from byol_jax.data.store import load_arrays
from byol_jax.errors import ConfigError

__all__ = [
    "Batches", "augment", "augment_views", "build_eval", "build_linear_train",
    "build_pretrain", "describe", "load_arrays", "normalize", "resolve",
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
  deterministic in (config.seed, step). `arrays` (uint8 images [N, H, W, 3],
  int32 labels [N]) replace the train split. Raises ConfigError.
  """
  return _build(config, mesh, "pretrain", config.data.train_split,
                config.batch_size, config.seed, start_step, arrays=arrays)


def build_linear_train(config: ml_collections.ConfigDict, mesh: Mesh,
                       batch_size: int, seed: int, start_step: int = 0, *,
                       split: str | None = None,
                       fraction: float = 1.0) -> Batches:
  """Random resized crop + flip batches for linear evaluation and fine-tuning.

  `batch(step)` -> {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32
  [B]}, deterministic in (seed, step); `fraction` < 1 reads a seeded subset
  (class-balanced except for TFDS).
  """
  return _build(config, mesh, "linear", split or config.data.train_split,
                batch_size, seed, start_step, fraction)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh,
               split: str | None, batch_size: int) -> Batches:
  """One pass over `split` per iteration, centre-cropped, padded and masked.

  Yields {'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B], 'mask':
  bool [B]} (padding: label -1); passes reuse the compiled functions.
  `split` '' or None: `describe(config).eval_split`.
  """
  if not split:
    split = describe(config).eval_split
    if split is None:
      raise ConfigError("The dataset has no val, validation or test split; "
                        "set --config.data.eval_split.")
  return _build(config, mesh, "eval", split, batch_size, config.seed)
