"""TFDS datasets: builders, splits, labels and undecoded records.

Importing it hides the GPUs and TPUs from TensorFlow (JAX owns them).
"""
import re
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import progress
from byol_jax.data import sources
from byol_jax.errors import ConfigError

try:
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # Already initialised, or no such kind.
  pass


def builder(data_cfg: Any):
  """The prepared TFDS builder of config.data.name, or a ConfigError."""
  data_dir = data_cfg.get("data_dir") or None
  try:
    b = tfds.builder(data_cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
        f"Unknown TFDS dataset config.data.name={data_cfg.name!r}; use a TFDS "
        "name (e.g. 'imagenet2012') or --config.data.source=folder/npz.") from e
  if not b.info.splits:
    raise ConfigError(
        f"TFDS dataset {data_cfg.name!r} is not prepared in data_dir="
        f"{data_dir or tfds.core.constants.DATA_DIR!r}; run `tfds build "
        f"{data_cfg.name}` there or set --config.data.data_dir.")
  return b


def split_size(b, split: str, field: str = "train_split / eval_split") -> int:
  """Examples in `split`, a TFDS split spec such as 'train[:10%]'."""
  for part in split.split("+"):
    base = re.sub(r"\[.*\]$", "", part.strip())
    if base not in b.info.splits:
      raise sources.split_not_found(base, f"TFDS dataset {b.name!r}",
                                    sorted(b.info.splits), field)
  return int(b.info.splits[split].num_examples)


def keys(b) -> tuple[str, str | None]:
  """(image feature, label feature or None)."""
  supervised = b.info.supervised_keys
  if supervised and len(supervised) == 2 and isinstance(supervised[0], str):
    return supervised[0], supervised[1]
  return "image", ("label" if "label" in b.info.features else None)


def class_names(b) -> tuple[str, ...]:
  """The names of the label feature's classes; () if it has none."""
  label_key = keys(b)[1]
  feature = b.info.features[label_key] if label_key else None
  return (tuple(feature.names)
          if isinstance(feature, tfds.features.ClassLabel) else ())


def process_split(b, split: str, process_index: int, process_count: int
                  ) -> tuple[str, int, int]:
  """(this process's sub-split, its size, index of its first example)."""
  subs = tfds.even_splits(split, n=process_count, drop_remainder=False)
  sizes = [int(b.info.splits[s].num_examples) for s in subs]
  return subs[process_index], sizes[process_index], sum(sizes[:process_index])


def _convert(b, ex, index):
  image_key, label_key = keys(b)
  label = (tf.cast(ex[label_key], tf.int32) if label_key
           else tf.constant(-1, tf.int32))
  return dict(data=ex[image_key], label=label, index=index)


def records(b, split: str, first: int = 0) -> tf.data.Dataset:
  """Undecoded {'data': encoded image, 'label': int32 (-1: none), 'index':
  int64 first, first + 1, ...} of `split` in order."""
  ds = b.as_dataset(split=split, shuffle_files=False,
                    decoders={keys(b)[0]: tfds.decode.SkipDecoding()},
                    read_config=tfds.ReadConfig(try_autocache=False))
  return tf.data.Dataset.zip(ds, tf.data.Dataset.range(first, tf.int64.max)
                             ).map(lambda ex, i: _convert(b, ex, i),
                                   num_parallel_calls=tf.data.AUTOTUNE)


def _file_blocks(b, split: str):
  """(file names, records to skip, to take, index of each block's first
  record in `split`) of the files `split` reads."""
  fis = b.info.splits[split].file_instructions
  takes = [int(f.take) for f in fis]
  return ([str(f.filename) for f in fis], [int(f.skip) for f in fis], takes,
          [sum(takes[:i]) for i in range(len(takes))])


def shuffles_files(b) -> bool:
  """Whether `epoch_records` can read `b` (TFRecord files)."""
  return str(getattr(b.info, "file_format", "tfrecord")).lower().endswith(
      "tfrecord")


def epoch_records(b, split: str, seed: int, epoch: tf.Tensor,
                  cycle_length: int = 16) -> tf.data.Dataset:
  """`records` of `split`, its files in an order seeded by (seed, `epoch`)
  and interleaved `cycle_length` at a time."""
  names, skips, takes, starts = _file_blocks(b, split)
  table = [tf.constant(v) for v in (names, skips, takes, starts)]
  order = tf.random.experimental.stateless_shuffle(
      tf.range(len(names), dtype=tf.int64),
      seed=tf.stack([tf.constant(seed, tf.int64),
                     tf.cast(epoch, tf.int64)]))
  decoders = {keys(b)[0]: tfds.decode.SkipDecoding()}

  def read(i):
    name, skip, take, start = (tf.gather(t, i) for t in table)
    raw = tf.data.TFRecordDataset(name).skip(tf.cast(skip, tf.int64)).take(
        tf.cast(take, tf.int64))
    return tf.data.Dataset.zip(
        raw, tf.data.Dataset.range(tf.cast(start, tf.int64), tf.int64.max))

  def convert(serialized, index):
    return _convert(b, b.info.features.deserialize_example(
        serialized, decoders=decoders), index)

  ds = tf.data.Dataset.from_tensor_slices(order).interleave(
      read, cycle_length=min(cycle_length, max(len(names), 1)),
      block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def decoded_split(data_cfg: Any, split: str
                  ) -> tuple[list[np.ndarray], np.ndarray]:
  """A whole TFDS split decoded to numpy (for small sets on the devices)."""
  b = builder(data_cfg)
  n = split_size(b, split)
  ds = records(b, split).map(
      lambda ex: (tf.io.decode_image(ex["data"], channels=3,
                                     expand_animations=False), ex["label"]),
      num_parallel_calls=tf.data.AUTOTUNE)
  pairs = list(progress.track(ds.as_numpy_iterator(),
                              f"decoding {data_cfg.name} {split}", n, "images"))
  return [p[0] for p in pairs], np.asarray([p[1] for p in pairs], np.int32)
