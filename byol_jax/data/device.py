"""The on-device path, for sets that fit in accelerator memory.

The decoded split sits on every device (`store.load_canvas`); each step the
host sends (example, step, row) triples and one jitted function cuts the
crops with keys fold_in(fold_in(key, step), row).
"""
import functools
import itertools
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.data import crops
from byol_jax.data import order
from byol_jax.data import pipeline
from byol_jax.data import store

# Keeps the crops' random stream apart from the train step's
# fold_in(key(seed), step) augmentation keys.
CROP_STREAM = 0x5EED0002


@functools.lru_cache(maxsize=2)
def _placed(canvas: store.Canvas, mesh: Mesh) -> tuple[jax.Array, ...]:
  """A canvas's (images, sizes) replicated on every device (for all modes)."""
  put = lambda x: jax.make_array_from_callback(
      x.shape, sharding.replicated(mesh), lambda idx: x[idx])
  return put(canvas.images), put(canvas.sizes)


def _ids(index: np.ndarray, step: int, rows: slice) -> np.ndarray:
  """int32 [L, 3]: (example index, step, row of the global batch)."""
  return np.stack([index, np.full_like(index, step),
                   np.arange(rows.start, rows.stop)], axis=1).astype(np.int32)


def train_batches(labels: np.ndarray, keep: np.ndarray, seed: int,
                  batch: int, start_step: int, process_index: int,
                  process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's {'ids': int32 [L, 3], 'label': int32 [L]} from
  `start_step` on, reading `keep` (int64 [M], the split or its subset)."""
  rows = order.local_rows(batch, process_index, process_count)
  for step in itertools.count(start_step):
    j = keep[order.stream_indices(seed, step, batch, keep.shape[0])[rows]]
    yield dict(ids=_ids(j, step, rows), label=labels[j].astype(np.int32))


def eval_batches(labels: np.ndarray, local_batch: int, process_index: int,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """One padded pass of {'ids', 'label' (-1 on padding), 'mask'}, the same
  number of batches on every process."""
  rows = slice(0, local_batch)
  for index in order.eval_plan(labels.shape[0], local_batch, process_index,
                               process_count):
    valid = index >= 0
    j = np.where(valid, index, 0)
    yield dict(ids=_ids(j, 0, rows), mask=valid,
               label=np.where(valid, labels[j], -1).astype(np.int32))


def _crop_fn(mesh: Mesh, mode: str, config: ml_collections.ConfigDict,
             seed: int, return_boxes: bool):
  """Jitted (images, sizes, global batch) -> the mode's global batch."""
  size = int(config.data.image_size)
  scale, ratio = crops.scale_and_ratio(config.data, mode)
  fraction = float(config.data.eval_crop_fraction)

  def one(image, hw, ids):             # u8 [Hc, Wc, 3], i32 [2], i32 [3].
    if mode == "eval":
      box = crops.center_box(*hw.astype(jnp.float32), fraction)
      return dict(image=crops.crop_resize(image, hw, box, size))
    key = jax.random.fold_in(jax.random.key(seed), CROP_STREAM)
    k1, k2 = jax.random.split(
        jax.random.fold_in(jax.random.fold_in(key, ids[1]), ids[2]))
    crop = lambda k: crops.random_resized_crop(k, image, hw, size, scale,
                                               ratio)
    if mode == "linear":
      image, box = crop(k1)
      return dict(image=augment.random_flip(k2, image), box=box)
    (v1, b1), (v2, b2) = crop(k1), crop(k2)
    return dict(view1=v1, view2=v2, box1=b1, box2=b2)

  def per_device(images, sizes, ids):   # Replicated set, this device's rows.
    return jax.vmap(one)(images[ids[:, 0]], sizes[ids[:, 0]], ids)

  cut = pipeline.on_rows(mesh, per_device, num_replicated=2)

  @jax.jit
  def finish(images, sizes, batch):
    out = {k: v for k, v in cut(images, sizes, batch["ids"]).items()
           if return_boxes or not k.startswith("box")}
    return dict(out, **{k: v for k, v in batch.items() if k != "ids"})
  return finish


def build(config: ml_collections.ConfigDict, mesh: Mesh, mode: str,
          split: str, batch_size: int, seed: int, start_step: int = 0,
          fraction: float = 1.0, arrays=None, canvas: store.Canvas = None,
          return_boxes: bool = False) -> pipeline.Batches:
  """`host.build` on device; `canvas` (a `store.Canvas`) replaces `split`."""
  canvas = canvas or store.load_canvas(config.data, split, arrays)
  images, sizes = _placed(canvas, mesh)
  fn = functools.partial(_crop_fn(mesh, mode, config, seed, return_boxes),
                         images, sizes)
  pi, pc = order.process()
  if mode == "eval":
    n = canvas.num_examples
    start = lambda step: eval_batches(canvas.labels, batch_size // pc, pi, pc)
    return pipeline.Batches(
        mesh, start, fn, num_examples=n, batch_size=batch_size,
        num_batches=order.num_eval_batches(n, batch_size // pc, pc))
  keep = order.subset(canvas.labels, fraction, seed)
  start = lambda step: train_batches(canvas.labels, keep, seed, batch_size,
                                     step, pi, pc)
  return pipeline.Batches(mesh, start, fn, num_examples=keep.shape[0],
                          batch_size=batch_size, start_step=start_step,
                          prefetch=1)
