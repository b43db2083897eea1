"""The host path: tf.data decodes and crops on the CPUs.

Folder, npz and arrays follow `order`'s epoch permutations; TFDS reads this
process's `tfds.even_splits` share, each epoch's files in a (seed, epoch)
order through a seeded shuffle buffer. Per-element randomness is stateless
in (seed, global stream position).
"""
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from byol_jax.data import crops
from byol_jax.data import host_decode
from byol_jax.data import order
from byol_jax.data import pipeline
from byol_jax.data import sources
from byol_jax.data import tfds_source

_INT64_MAX = np.iinfo(np.int64).max


def _reader(split: sources.Split):
  """(read(i) -> (data, label), form) of a folder, npz or arrays split."""
  labels = tf.constant(split.labels, tf.int32)
  table = (tf.convert_to_tensor(split.images) if split.images is not None
           else tf.constant(list(split.paths or split.encoded)))
  fetch = tf.io.read_file if split.paths is not None else lambda x: x
  form = ("pixels" if split.images is not None else
          "jpeg" if split.all_jpeg else "encoded")
  return (lambda i: (fetch(tf.gather(table, i)), tf.gather(labels, i))), form


def _index_stream(split, seed, batch, start_step, pi, pc, fraction, parallel):
  rows = order.local_rows(batch, pi, pc)
  keep = order.subset(split.labels, fraction, seed)               # [M]

  def steps():
    for step in itertools.count(start_step):
      j = order.stream_indices(seed, step, batch, keep.shape[0])[rows]
      yield keep[j], step * batch + np.arange(rows.start, rows.stop)
  spec = tf.TensorSpec([rows.stop - rows.start], tf.int64)
  ds = tf.data.Dataset.from_generator(steps, output_signature=(spec, spec))
  read, form = _reader(split)
  ds = ds.unbatch().map(lambda i, g: (*read(i), g),
                        num_parallel_calls=parallel, deterministic=True)
  return ds, form, int(keep.shape[0])


def _tfds_stream(data_cfg, split, seed, batch, start_step, pi, pc, fraction):
  b = tfds_source.builder(data_cfg)
  total = tfds_source.split_size(b, split)
  sub, n_local, first = tfds_source.process_split(b, split, pi, pc)
  mask = None
  if fraction < 1.0:        # A seeded subset of example indices, as a mask.
    keep = np.zeros((total,), bool)
    keep[order.subset(np.full((total,), -1), fraction, seed)] = True
    mask = tf.constant(keep)
    total, n_local = int(keep.sum()), int(keep[first:first + n_local].sum())

  def subset(records):      # Records with a (split-wide) 'index'.
    if mask is None:
      return records
    return records.filter(lambda ex: tf.gather(mask, first + ex["index"]))

  shuffle_files = not data_cfg.cache and tfds_source.shuffles_files(b)
  if not shuffle_files:     # In file order (cached, or not TFRecord files).
    base = subset(tfds_source.records(b, sub))
    base = base.cache() if data_cfg.cache else base
  local = batch // pc
  epoch0, offset = divmod(start_step * local, max(n_local, 1))
  buffer = max(1, int(data_cfg.shuffle_buffer))

  def epoch(e):             # Epoch e: its file order, then the buffer.
    records = (subset(tfds_source.epoch_records(b, sub, seed, e))
               if shuffle_files else base)
    return records.shuffle(buffer, seed=seed * 1_000_003 + e,
                           reshuffle_each_iteration=False)
  ds = tf.data.Dataset.range(epoch0, _INT64_MAX).flat_map(epoch).skip(offset)
  positions = tf.data.Dataset.range(start_step * local, _INT64_MAX).map(
      lambda k: k // local * batch + pi * local + k % local)
  ds = tf.data.Dataset.zip(ds, positions).map(
      lambda ex, g: (ex["data"], ex["label"], g))
  return ds, "encoded", total


def _options(ds, config):
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_fusion = True   # Read + crop maps.
  options.threading.max_intra_op_parallelism = 1  # Cores run other elements.
  if _parallel(config) > 0:                   # Not AUTOTUNE (-1).
    options.threading.private_threadpool_size = _parallel(config)
  return ds.with_options(options)


def _parallel(config) -> int:
  """data.num_parallel_calls <= 0 autotunes, N > 0 caps the pool at N."""
  n = int(config.data.num_parallel_calls)
  return tf.data.AUTOTUNE if n <= 0 else n


def canvas_side(config: ml_collections.ConfigDict) -> int:
  """The training canvases' side: data.canvas_size, or image_size if 0/absent."""
  return int(config.data.get("canvas_size", 0) or config.data.image_size)


def train_dataset(config: ml_collections.ConfigDict, mode: str, *,
                  split: str | None = None, batch_size: int | None = None,
                  seed: int | None = None, start_step: int = 0,
                  fraction: float = 1.0, process_index: int | None = None,
                  process_count: int | None = None, arrays=None,
                  return_boxes: bool = False, device_resize: bool = True):
  """(this process's tf.data stream of training batches, examples read).

  'pretrain': {'view1', 'view2' (uint8 [L, C, C, 3]), 'hw1', 'hw2' (crop
  sizes), 'label', 'failed'}; 'linear': {'image', 'hw', 'label', 'failed'}.
  `return_boxes` adds the crop windows 'box1', 'box2' or 'box'.
  """
  pi, pc = order.process(process_index, process_count)
  split = split or config.data.train_split
  batch = int(batch_size or config.batch_size)
  seed = int(config.seed if seed is None else seed)
  size = int(config.data.image_size)
  scale, ratio = crops.scale_and_ratio(config.data, mode)
  if config.data.source == "tfds" and arrays is None:
    ds, form, n = _tfds_stream(config.data, split, seed, batch, start_step,
                                  pi, pc, fraction)
  else:
    ds, form, n = _index_stream(
        sources.get_split(config.data, split, arrays), seed, batch,
        start_step, pi, pc, fraction, _parallel(config))

  def window(key):
    return lambda h, w: host_decode.crop_window(key, h, w, scale, ratio)
  decode = functools.partial(host_decode.decode_crops, form=form, size=size,
                             canvas=canvas_side(config),
                             device_resize=device_resize)

  local = batch // pc

  def element(data, label, g):
    base = tf.stack([tf.constant(seed, tf.int64), g])
    keys = [tf.random.experimental.stateless_fold_in(base, v) for v in (1, 2)]
    if mode == "linear":
      ((image, hw),), (box,) = decode(data, window_fns=[window(keys[0])],
                                      flip_seed=keys[1])
      out = dict(image=image, hw=hw, box=box)
    else:
      ((v1, hw1), (v2, hw2)), (b1, b2) = decode(
          data, window_fns=[window(k) for k in keys])
      out = dict(view1=v1, hw1=hw1, view2=v2, hw2=hw2, box1=b1, box2=b2)
    out = {key: v for key, v in out.items()
           if return_boxes or not key.startswith("box")}
    # k: the element's place in this process's stream (step * L + row).
    return dict(out, label=label, k=g // batch * local + g % batch - pi * local)

  ds = ds.map(element, num_parallel_calls=_parallel(config),
              deterministic=True)
  ds = _replace_failures(ds, first=start_step * local)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _options(ds, config), n


def _replace_failures(ds, first: int):
  """Replaces each element that failed to decode by the next that did
  (filling places `k` from `first`), so that no later element shifts."""
  ds = ds.ignore_errors(log_warning=False)   # Counted instead (`failed`).

  def gap(previous, e):
    return e["k"], (e, e["k"] - previous - 1)

  def fill(e, missing):
    e = {key: v for key, v in e.items() if key != "k"}
    return tf.data.Dataset.range(missing + 1).map(
        lambda j: dict(e, failed=j < missing))

  return ds.scan(tf.constant(first - 1, tf.int64), gap).flat_map(fill)


def eval_dataset(config: ml_collections.ConfigDict, split: str,
                 batch_size: int, process_index: int | None = None,
                 process_count: int | None = None):
  """(one padded pass of this process's {'image', 'hw', 'label', 'mask',
  'index'}, split size, batches)."""
  pi, pc = order.process(process_index, process_count)
  local = batch_size // pc
  size = int(config.data.image_size)
  fraction = float(config.data.eval_crop_fraction)
  if config.data.source == "tfds":
    b = tfds_source.builder(config.data)
    total = tfds_source.split_size(b, split)
    sub, _, first = tfds_source.process_split(b, split, pi, pc)
    ds = tfds_source.records(b, sub, first).map(
        lambda ex: (ex["data"], ex["label"], ex["index"]))
    form = "encoded"
  else:
    s = sources.get_split(config.data, split)
    read, form = _reader(s)
    total = s.num_examples
    ds = tf.data.Dataset.range(pi, total, pc)
    ds = ds.map(lambda i: (*read(i), i))

  def center(data, label, i):
    window = lambda h, w: host_decode.center_window(h, w, fraction)
    ((image, hw),), _ = host_decode.decode_crops(data, form, [window], size,
                                                 fast=False)
    return dict(image=image, hw=hw, label=label, mask=tf.constant(True),
                index=i)

  ds = ds.map(center, num_parallel_calls=_parallel(config), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors(dict(
      image=tf.zeros([size, size, 3], tf.uint8),
      hw=tf.constant([size, size]), label=tf.constant(-1),
      mask=tf.constant(False), index=tf.constant(-1, tf.int64))).repeat()
  num_batches = order.num_eval_batches(total, local, pc)
  ds = ds.concatenate(pad).batch(local, drop_remainder=True).take(num_batches)
  return _options(ds.prefetch(tf.data.AUTOTUNE), config), total, num_batches


def finish_fn(mesh: Mesh, mode: str, size: int):
  """Jitted: the accelerators resize each crop to S x S (as `host_decode.fit`
  would), uint8 for pretraining (the step converts), else f32 in [0, 1]."""
  views = (dict(view1="hw1", view2="hw2") if mode == "pretrain"
           else dict(image="hw"))
  above = 1.0 if mode == "eval" else crops.PLAIN_SHRINK_MAX

  def per_device(batch):
    out = dict(batch)
    for key, hw_key in views.items():
      x = jax.vmap(lambda c, hw: crops.crop_resize(           # [l, S, S, 3]
          c, hw, (0.0, 0.0, *hw.astype(jnp.float32)), size, above))(
              out[key], out.pop(hw_key))
      out[key] = (jnp.round(x * 255.0).astype(jnp.uint8)
                  if mode == "pretrain" else x)
    return out
  return jax.jit(pipeline.on_rows(mesh, per_device))


def build(config: ml_collections.ConfigDict, mesh: Mesh, mode: str,
          split: str, batch_size: int, seed: int, start_step: int = 0,
          fraction: float = 1.0, arrays: Any = None,
          return_boxes: bool = False) -> pipeline.Batches:
  """Global batches of `mode` ('pretrain', 'linear' or 'eval'), counting
  the elements that failed to decode in `failures`."""
  finish = finish_fn(mesh, mode, int(config.data.image_size))
  if mode == "eval":
    ds, total, num_batches = eval_dataset(config, split, batch_size)
    start = lambda step: ({k: v for k, v in b.items() if k != "index"}
                          for b in ds.as_numpy_iterator())
    return pipeline.Batches(mesh, start, finish, num_examples=total,
                            batch_size=batch_size, num_batches=num_batches)
  kwargs = dict(split=split, batch_size=batch_size, seed=seed,
                fraction=fraction, arrays=arrays, return_boxes=return_boxes)
  first, n = train_dataset(config, mode, start_step=start_step, **kwargs)
  failures = {}

  def start(step):
    ds = (first if step == start_step else
          train_dataset(config, mode, start_step=step, **kwargs)[0])
    for s, local in enumerate(ds.as_numpy_iterator(), step):
      if bad := int(np.sum(local.pop("failed"))):
        failures[s] = bad
      yield local
  return pipeline.Batches(mesh, start, finish, num_examples=n,
                          batch_size=batch_size, start_step=start_step,
                          failures=failures)
