"""The fully on-device input path for sets that fit in accelerator memory.

The uint8 split is put on every device once (replicated). Each step, one
jitted function draws the batch's examples from a per-epoch permutation
(`fold_in(perm_key, epoch)`), gathers them, and cuts two random resized crops
per image (`fold_in(crop_key, step)`), all on the accelerators and sharded
over the mesh's `data` axis: the host only dispatches. No TensorFlow.

Positions: the global stream is the concatenation of the epochs'
permutations; step s covers stream positions [s B, (s + 1) B). A batch is a
pure function of (seed, step), so resuming at any step reproduces it, and it
does not depend on the number of processes.
"""
import functools
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax import sharding
from byol_jax.data import crops
from byol_jax.data import sources

# Salts that keep the data's random streams apart from the train step's
# fold_in(PRNGKey(seed), step) augmentation keys.
PERM_STREAM = 0x5EED0001
CROP_STREAM = 0x5EED0002


def data_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(permutation key, crop key) of a run's seed."""
  root = jax.random.PRNGKey(seed)
  return jax.random.fold_in(root, PERM_STREAM), jax.random.fold_in(
      root, CROP_STREAM)


def stream_indices(perm_key: jax.Array, epoch0: jax.Array, offset: jax.Array,
                   batch: int, num_examples: int, spans: int) -> jax.Array:
  """Example indices at stream positions epoch0 * N + offset + [0, batch).

  Args:
    perm_key: key of the per-epoch permutations.
    epoch0: the epoch of the first position (int32 scalar).
    offset: its position within that epoch, < N (int32 scalar).
    batch: number of positions B.
    num_examples: N.
    spans: number of epochs the positions touch (static).

  Returns:
    int32 [B].
  """
  perms = jnp.stack([
      jax.random.permutation(jax.random.fold_in(perm_key, epoch0 + t),
                             num_examples)
      for t in range(spans)])                                    # [T, N]
  j = offset + jnp.arange(batch, dtype=jnp.int32)                # [B]
  return perms[j // num_examples, j % num_examples].astype(jnp.int32)


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """Places a host array (the same on every process) on every device."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.replicated(mesh),
                                      lambda idx: x[idx])


def _span(step: int, batch: int, n: int) -> tuple[int, int, int]:
  start = step * batch
  epoch0, offset = divmod(start, n)
  return epoch0, offset, (offset + batch - 1) // n + 1


class DevicePretrainData:
  """Two-view pretraining batches cut on the accelerators.

  Attributes:
    num_examples: size of the train split.
    steps_per_epoch: num_examples // batch_size.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               images: np.ndarray, labels: np.ndarray, start_step: int = 0,
               return_boxes: bool = False):
    """Puts the split on the devices and compiles the batch function.

    Args:
      config: the run's config (seed, batch_size, data.image_size,
        data.crop_scale, data.crop_ratio).
      mesh: the device mesh.
      images: uint8 [N, H, W, 3], the same on every process.
      labels: int32 [N].
      start_step: the first step that will be asked for.
      return_boxes: also return 'box1', 'box2': f32 [B, 4] crop boxes
        (y0, x0, h, w) as fractions of the image (for tests).
    """
    self.batch_size = int(config.batch_size)
    sharding.check_batch_size(self.batch_size, mesh)
    self.num_examples = int(images.shape[0])
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._next_step = start_step
    self._images = put_replicated(images, mesh)       # uint8 [N, H, W, 3]
    self._labels = put_replicated(np.asarray(labels, np.int32), mesh)
    perm_key, crop_key = data_keys(int(config.seed))
    size = int(config.data.image_size)
    scale = tuple(float(s) for s in config.data.crop_scale)
    ratio = tuple(float(r) for r in config.data.crop_ratio)
    batch_sharding = sharding.batch_sharding(mesh)
    b, n = self.batch_size, self.num_examples

    def make_batch(images, labels, epoch0, offset, step, spans):
      idx = stream_indices(perm_key, epoch0, offset, b, n, spans)   # [B]
      idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
      picked = images[idx]                                 # u8 [B, H, W, 3]
      keys = jax.random.split(jax.random.fold_in(crop_key, step), 2 * b)
      crop = jax.vmap(
          lambda k, im: crops.random_resized_crop(k, im, size, scale, ratio))
      view1, box1 = crop(keys[:b], picked)                 # [B, S, S, 3]
      view2, box2 = crop(keys[b:], picked)
      out = dict(view1=view1, view2=view2, label=labels[idx])
      if return_boxes:
        out.update(box1=box1, box2=box2)
      return out

    self._fn = jax.jit(make_batch, static_argnums=(5,),
                       out_shardings=batch_sharding)

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of `step`: {'view1', 'view2': f32 [B, S, S, 3] in
    [0, 1], 'label': int32 [B]}, sharded over the mesh's data axis."""
    epoch0, offset, spans = _span(step, self.batch_size, self.num_examples)
    self._next_step = step + 1
    scalars = jax.device_put((np.int32(epoch0), np.int32(offset),
                              np.uint32(step)), self._images.sharding)
    return self._fn(self._images, self._labels, *scalars, spans)


class DeviceLinearTrainData:
  """Random resized crop + flip batches for linear evaluation, on device."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               images: np.ndarray, labels: np.ndarray, batch_size: int,
               seed: int):
    self.batch_size = int(batch_size)
    sharding.check_batch_size(self.batch_size, mesh)
    self.num_examples = int(images.shape[0])
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._images = put_replicated(images, mesh)
    self._labels = put_replicated(np.asarray(labels, np.int32), mesh)
    perm_key, crop_key = data_keys(int(seed))
    size = int(config.data.image_size)
    scale = tuple(float(s) for s in config.data.crop_scale)
    ratio = tuple(float(r) for r in config.data.crop_ratio)
    batch_sharding = sharding.batch_sharding(mesh)
    b, n = self.batch_size, self.num_examples

    def one(key, flip, image):
      crop, _ = crops.random_resized_crop(key, image, size, scale, ratio)
      return jnp.where(flip, crop[:, ::-1], crop)

    def make_batch(images, labels, epoch0, offset, step, spans):
      idx = stream_indices(perm_key, epoch0, offset, b, n, spans)
      idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
      key = jax.random.fold_in(crop_key, step)
      k_crop, k_flip = jax.random.split(key)
      flips = jax.random.bernoulli(k_flip, 0.5, (b,))
      keys = jax.random.split(k_crop, b)
      return dict(image=jax.vmap(one)(keys, flips, images[idx]),
                  label=labels[idx])

    self._fn = jax.jit(make_batch, static_argnums=(5,),
                       out_shardings=batch_sharding)

  def batch(self, step: int) -> dict[str, jax.Array]:
    """{'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B]}."""
    epoch0, offset, spans = _span(step, self.batch_size, self.num_examples)
    scalars = jax.device_put((np.int32(epoch0), np.int32(offset),
                              np.uint32(step)), self._images.sharding)
    return self._fn(self._images, self._labels, *scalars, spans)


# ---------------------------------------------------------------------------
# Evaluation from in-memory arrays.
# ---------------------------------------------------------------------------


def num_eval_batches(num_examples: int, local_batch: int,
                     process_count: int) -> int:
  """Batches per process for one padded pass (the same on every process)."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) /
                          local_batch))


def eval_local_batches(images: np.ndarray, labels: np.ndarray,
                       local_batch: int, process_index: int,
                       process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of a split, padded with masks.

  Args:
    images: [N, S, S, 3], every example of the split.
    labels: int32 [N].
    local_batch: per-process batch.
    process_index, process_count: this process and the number of them.

  Yields:
    {'image': [L, S, S, 3], 'label': int32 [L], 'mask': bool [L],
    'index': int64 [L] (example index, -1 on padding)}.
  """
  n = images.shape[0]
  idx = sources.shard_indices(n, process_index, process_count)
  for b in range(num_eval_batches(n, local_batch, process_count)):
    sel = idx[b * local_batch:(b + 1) * local_batch]
    k = sel.shape[0]
    pad = local_batch - k
    take = np.concatenate([sel, np.zeros((pad,), np.int64)]) if n else sel
    yield dict(
        image=images[take],
        label=np.where(np.arange(local_batch) < k, labels[take], -1
                       ).astype(np.int32),
        mask=np.arange(local_batch) < k,
        index=np.concatenate([sel, np.full((pad,), -1, np.int64)]))


@functools.lru_cache(maxsize=None)
def _to_float_fn(mesh: Mesh):
  """Jitted: uint8 'image' -> float32 [0, 1], keeping the batch sharding."""
  def convert(batch):
    out = dict(batch)
    if jnp.issubdtype(out["image"].dtype, jnp.integer):
      out["image"] = out["image"].astype(jnp.float32) * (1.0 / 255.0)
    return out
  return jax.jit(convert, out_shardings=sharding.batch_sharding(mesh))


def to_global_float_batch(local: dict[str, np.ndarray], mesh: Mesh
                         ) -> dict[str, jax.Array]:
  """Global batch with 'image' as float32 in [0, 1] ('index' dropped)."""
  local = {k: v for k, v in local.items() if k != "index"}
  return _to_float_fn(mesh)(sharding.global_batch(local, mesh))


class ArrayEvalData:
  """Centre-cropped eval batches from in-memory arrays (no TensorFlow)."""

  def __init__(self, mesh: Mesh, images: np.ndarray, labels: np.ndarray,
               batch_size: int, process_index: int | None = None,
               process_count: int | None = None):
    self._mesh = mesh
    self._images, self._labels = images, labels
    self.batch_size = int(batch_size)
    self._local = sharding.check_batch_size(self.batch_size, mesh)
    self.num_examples = int(images.shape[0])
    self._pi = jax.process_index() if process_index is None else process_index
    self._pc = jax.process_count() if process_count is None else process_count
    if process_count is not None:
      self._local = self.batch_size // self._pc

  def local_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded batches (numpy, with 'index')."""
    return eval_local_batches(self._images, self._labels, self._local,
                              self._pi, self._pc)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    for local in self.local_batches():
      yield to_global_float_batch(local, self._mesh)

  def __len__(self) -> int:
    return num_eval_batches(self.num_examples, self._local, self._pc)
