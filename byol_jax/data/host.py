"""The host input pipeline: tf.data over TFDS, image folders, .npz and arrays.

TensorFlow is imported lazily (only when a function here runs), and its
GPUs are hidden so that it never takes accelerator memory.

Determinism and resume. Every random choice is a stateless op seeded by
(config.seed, stream position), and the order is a pure function of the seed:
- index-addressable sources (folder, npz, arrays): the global stream is the
  concatenation of per-epoch permutations (`tf.random.experimental.
  index_shuffle` seeded by (seed, epoch)); step s covers stream positions
  [s B, (s + 1) B) and process p reads the positions s B + p L + [0, L)
  (L = B / process_count). Resuming at a step starts `Dataset.range` there:
  nothing is read or decoded before it. Batches do not depend on the number
  of processes.
- TFDS: each process reads its `tfds.even_splits` share; epoch e is that
  share shuffled with a buffer seeded by (seed, e); resuming skips the raw
  (undecoded) records of at most one epoch.

Pretraining elements get two independent random resized crops (area
U[crop_scale], log-uniform aspect in crop_ratio, first fitting candidate of
10, else a centred crop), decoded with the fused `decode_and_crop_jpeg` for
JPEGs, resized bicubically to image_size and kept uint8 (flip, colour and
the rest run on the accelerator, `augment.py`).

Threads: config.data.num_parallel_calls <= 0 lets tf.data autotune; a
positive N sets the parallelism of the maps and caps the pipeline's private
thread pool at N threads.
"""
import functools
import math
import re
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax import sharding
from byol_jax.data import device
from byol_jax.data import sources
from byol_jax.errors import ConfigError

_INT64_MAX = np.iinfo(np.int64).max
_PERM_SALT = 0x5EED0001
_MAX_ATTEMPTS = 10


@functools.cache
def _tf():
  """Imports TensorFlow once, hiding its GPUs and TPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass
  return tf


# ---------------------------------------------------------------------------
# Crop windows and decoding (inside tf.data map functions).
# ---------------------------------------------------------------------------


def sample_crop_window(seed, height, width, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3), attempts: int = _MAX_ATTEMPTS):
  """Random-resized-crop window, the integer twin of crops.sample_crop_box.

  Args:
    seed: stateless seed, int [2].
    height, width: image size (int32 scalars).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio w / h (sampled log-uniformly).
    attempts: candidates before the centred fallback.

  Returns:
    int32 [4]: (y, x, h, w), as decode_and_crop_jpeg wants.
  """
  tf = _tf()
  seeds = tf.random.experimental.stateless_split(seed, 3)
  hf = tf.cast(height, tf.float32)
  wf = tf.cast(width, tf.float32)
  area = hf * wf * tf.random.stateless_uniform(
      [attempts], seeds[0], scale[0], scale[1])                   # [A]
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1])))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w <= wf) & (h <= hf) & (w >= 1) & (h >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)
  # Fallback: the largest centred box with its aspect ratio within range.
  in_aspect = wf / hf
  fh = tf.where(in_aspect < ratio[0], tf.round(wf / ratio[0]), hf)
  fw = tf.where(in_aspect > ratio[1], tf.round(hf * ratio[1]), wf)
  fh, fw = tf.clip_by_value(fh, 1, hf), tf.clip_by_value(fw, 1, wf)
  h = tf.where(found, tf.gather(h, first), fh)
  w = tf.where(found, tf.gather(w, first), fw)
  u = tf.random.stateless_uniform([2], seeds[2])
  y = tf.where(found, tf.floor(u[0] * (hf - h + 1)), tf.floor((hf - h) / 2))
  x = tf.where(found, tf.floor(u[1] * (wf - w + 1)), tf.floor((wf - w) / 2))
  y = tf.clip_by_value(y, 0, hf - h)
  x = tf.clip_by_value(x, 0, wf - w)
  return tf.cast(tf.stack([y, x, h, w]), tf.int32)


def center_window(height, width, fraction: float):
  """Centred square of `fraction` of the shorter side: int32 [4] (y, x, h, w)."""
  tf = _tf()
  side = tf.cast(tf.round(fraction * tf.cast(tf.minimum(height, width),
                                             tf.float32)), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def _resize_uint8(image, size: int):
  """Bicubic resize of uint8 [h, w, 3] to uint8 [size, size, 3].

  Antialiased when shrinking (as PIL and the on-device path), plain when
  enlarging, where antialiasing changes nothing but costs twice the time.
  """
  tf = _tf()
  shape = tf.shape(image)
  resize = lambda aa: tf.image.resize(image, [size, size], method="bicubic",
                                      antialias=aa)
  out = tf.cond(tf.reduce_max(shape[:2]) > size, lambda: resize(True),
                lambda: resize(False))
  out = tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)
  return tf.ensure_shape(out, [size, size, 3])


def _crop(image, window):
  return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


def crops_of(data, encoded: bool, window_fns, size: int):
  """Decodes `data` and cuts one resized crop per window function.

  Args:
    data: encoded image bytes (tf.string scalar) if `encoded`, else a uint8
      [H, W, 3] image.
    encoded: which of the two `data` is.
    window_fns: functions (height, width) -> int32 [4] window.
    size: output side.

  Returns:
    (list of uint8 [size, size, 3], list of float32 [4] windows as fractions
    (y, x, h, w) of the image height / width).
  """
  tf = _tf()

  def from_image(image):
    shape = tf.shape(image)
    windows = [fn(shape[0], shape[1]) for fn in window_fns]
    return [_resize_uint8(_crop(image, w), size) for w in windows], windows, shape

  def from_jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    windows = [fn(shape[0], shape[1]) for fn in window_fns]
    outs = [_resize_uint8(tf.image.decode_and_crop_jpeg(data, w, channels=3),
                          size) for w in windows]
    return outs, windows, shape

  def from_other():
    return from_image(tf.io.decode_image(data, channels=3,
                                         expand_animations=False))

  if encoded:
    outs, windows, shape = tf.cond(tf.io.is_jpeg(data), from_jpeg, from_other)
  else:
    outs, windows, shape = from_image(data)
  hw = tf.cast(tf.stack([shape[0], shape[1], shape[0], shape[1]]), tf.float32)
  return outs, [tf.cast(w, tf.float32) / hw for w in windows]


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------


def tfds_builder(data_cfg: Any):
  """The TFDS builder of config.data.name, or a ConfigError."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_cfg.get("data_dir") or None
  try:
    builder = tfds.builder(data_cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
        f"Unknown TFDS dataset config.data.name={data_cfg.name!r}; use a TFDS "
        "name (e.g. 'imagenet2012') or --config.data.source=folder/npz.") from e
  if not builder.info.splits:
    raise ConfigError(
        f"TFDS dataset {data_cfg.name!r} is not prepared in data_dir="
        f"{data_dir or tfds.core.constants.DATA_DIR!r}; run `tfds build "
        f"{data_cfg.name}` there or set --config.data.data_dir.")
  return builder


def tfds_split_size(builder, split: str) -> int:
  """Examples in `split` (a TFDS split spec), or a ConfigError."""
  names = list(builder.info.splits.keys())
  for part in split.split("+"):
    base = re.sub(r"\[.*\]$", "", part.strip())
    if base not in names:
      raise ConfigError(
          f"Split {base!r} not in TFDS dataset {builder.name!r} (splits: "
          f"{', '.join(names)}); set config.data.train_split / eval_split.")
  return int(builder.info.splits[split].num_examples)


def _tfds_keys(builder) -> tuple[str, str | None]:
  keys = builder.info.supervised_keys
  if keys and len(keys) == 2 and isinstance(keys[0], str):
    return keys[0], keys[1]
  features = builder.info.features
  return "image", ("label" if "label" in features else None)


def _tfds_process_split(builder, split: str, process_index: int,
                        process_count: int) -> tuple[str, int, int]:
  """(this process's sub-split, its size, index of its first example)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  subs = tfds.even_splits(split, n=process_count, drop_remainder=False)
  sizes = [int(builder.info.splits[s].num_examples) for s in subs]
  return subs[process_index], sizes[process_index], sum(sizes[:process_index])


def _tfds_dataset(builder, split: str):
  """Undecoded {'data': bytes, 'label': int32} records of a TFDS split."""
  tf = _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  image_key, label_key = _tfds_keys(builder)
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))

  def convert(ex):
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    return dict(data=ex[image_key], label=label)
  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def tfds_numpy(data_cfg: Any, split: str
               ) -> tuple[list[np.ndarray], np.ndarray]:
  """A whole TFDS split decoded to numpy (for small sets)."""
  tf = _tf()
  builder = tfds_builder(data_cfg)
  tfds_split_size(builder, split)
  ds = _tfds_dataset(builder, split).map(
      lambda ex: (tf.io.decode_image(ex["data"], channels=3,
                                     expand_animations=False), ex["label"]))
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(label)
  return images, np.asarray(labels, np.int32)


# ---------------------------------------------------------------------------
# Element sources: (data, label, example index) by stream position.
# ---------------------------------------------------------------------------


class _IndexSource:
  """TF lookups into an index-addressable `sources.Split`."""

  def __init__(self, split: sources.Split):
    tf = _tf()
    self.split = split
    self.num_examples = split.num_examples
    self.encoded = split.images is None
    self._labels = tf.constant(split.labels, tf.int32)
    if split.paths is not None:
      self._paths = tf.constant(list(split.paths))
    elif split.encoded is not None:
      self._bytes = tf.constant(list(split.encoded))
    else:
      self._images = tf.convert_to_tensor(split.images)

  def read(self, i):
    """(data, label) of example i (int64 scalar)."""
    tf = _tf()
    if self.split.paths is not None:
      data = tf.io.read_file(tf.gather(self._paths, i))
    elif self.split.encoded is not None:
      data = tf.gather(self._bytes, i)
    else:
      data = tf.gather(self._images, i)
    return data, tf.gather(self._labels, i)


def _options(ds, config):
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # A fixed num_parallel_calls also caps the threads of the whole pipeline.
  threads = int(config.data.num_parallel_calls)
  if threads > 0:
    options.threading.private_threadpool_size = threads
  return ds.with_options(options)


def _parallel(config) -> int:
  tf = _tf()
  n = int(config.data.num_parallel_calls)
  return tf.data.AUTOTUNE if n <= 0 else n


def _process(process_index, process_count) -> tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _train_stream(config, split_name: str, batch_size: int, seed: int,
                  start_step: int, process_index: int, process_count: int,
                  arrays=None):
  """Unbatched (data, label, position) of this process, from start_step.

  Returns:
    (dataset of (data, label, position int64), encoded, num_examples).
  """
  tf = _tf()
  local = batch_size // process_count
  if config.data.source == "tfds":
    builder = tfds_builder(config.data)
    total = tfds_split_size(builder, split_name)
    sub, n_local, _ = _tfds_process_split(builder, split_name, process_index,
                                          process_count)
    base = _tfds_dataset(builder, sub)
    if config.data.cache:
      base = base.cache()
    buffer = max(1, int(config.data.shuffle_buffer))
    start = start_step * local
    epoch0, offset = divmod(start, max(n_local, 1))

    def epoch_ds(epoch):
      return base.shuffle(buffer, seed=seed * 1_000_003 + epoch,
                          reshuffle_each_iteration=False)
    ds = tf.data.Dataset.range(epoch0, _INT64_MAX).flat_map(epoch_ds)
    ds = ds.skip(offset)
    positions = tf.data.Dataset.range(start, _INT64_MAX).map(
        lambda k: k * process_count + process_index)
    ds = tf.data.Dataset.zip(ds, positions).map(
        lambda ex, g: (ex["data"], ex["label"], g))
    return ds, True, total

  split = sources.get_split(config.data, split_name, arrays=arrays)
  if split.num_skipped:
    logging.info("%s: %d corrupt files skipped.", split.name, split.num_skipped)
  src = _IndexSource(split)
  n = src.num_examples
  perm_seed = (seed + _PERM_SALT) % (2**31)

  def element(k):
    # Local position k -> global stream position g -> example index.
    g = (k // local) * batch_size + process_index * local + k % local
    epoch, j = g // n, g % n
    i = tf.random.experimental.index_shuffle(
        j, seed=tf.stack([tf.constant(perm_seed, tf.int64), epoch]),
        max_index=tf.constant(n - 1, tf.int64))
    data, label = src.read(i)
    return data, label, g

  ds = tf.data.Dataset.range(start_step * local, _INT64_MAX)
  ds = ds.map(element, num_parallel_calls=_parallel(config), deterministic=True)
  return ds, src.encoded, n


def pretrain_dataset(config: ml_collections.ConfigDict, start_step: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None, arrays=None,
                     return_boxes: bool = False):
  """This process's tf.data stream of two-view pretraining batches.

  Args:
    config: the run's config.
    start_step: first step of the stream.
    process_index, process_count: default jax.process_index()/count().
    arrays: optional (images, labels) for the 'arrays' source.
    return_boxes: add 'box1', 'box2': f32 [L, 4] crop windows (y, x, h, w)
      as fractions of the image (for tests).

  Returns:
    (dataset of {'view1', 'view2': uint8 [L, S, S, 3], 'label': int32 [L]},
    number of examples of the train split).
  """
  tf = _tf()
  pi, pc = _process(process_index, process_count)
  batch = int(config.batch_size)
  local = batch // pc
  size = int(config.data.image_size)
  scale = tuple(float(s) for s in config.data.crop_scale)
  ratio = tuple(float(r) for r in config.data.crop_ratio)
  seed = int(config.seed)
  ds, encoded, n = _train_stream(config, config.data.train_split, batch, seed,
                                 start_step, pi, pc, arrays)

  def two_views(data, label, g):
    base = tf.stack([tf.constant(seed, tf.int64), g])
    fns = [functools.partial(
        lambda s, h, w: sample_crop_window(s, h, w, scale, ratio),
        tf.random.experimental.stateless_fold_in(base, v)) for v in (1, 2)]
    (v1, v2), (b1, b2) = crops_of(data, encoded, fns, size)
    out = dict(view1=v1, view2=v2, label=label)
    if return_boxes:
      out.update(box1=b1, box2=b2)
    return out

  ds = ds.map(two_views, num_parallel_calls=_parallel(config),
              deterministic=True)
  ds = ds.ignore_errors(log_warning=True)   # Backstop for corrupt images.
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _options(ds, config), n


def linear_train_dataset(config: ml_collections.ConfigDict, batch_size: int,
                         seed: int, start_step: int = 0,
                         process_index: int | None = None,
                         process_count: int | None = None):
  """Random resized crop + flip batches {'image': uint8, 'label'} (local)."""
  tf = _tf()
  pi, pc = _process(process_index, process_count)
  local = batch_size // pc
  size = int(config.data.image_size)
  scale = tuple(float(s) for s in config.data.crop_scale)
  ratio = tuple(float(r) for r in config.data.crop_ratio)
  ds, encoded, n = _train_stream(config, config.data.train_split, batch_size,
                                 seed, start_step, pi, pc)

  def one_view(data, label, g):
    base = tf.stack([tf.constant(seed, tf.int64), g])
    crop_seed = tf.random.experimental.stateless_fold_in(base, 1)
    flip_seed = tf.random.experimental.stateless_fold_in(base, 2)
    (image,), _ = crops_of(
        data, encoded,
        [lambda h, w: sample_crop_window(crop_seed, h, w, scale, ratio)], size)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return dict(image=image, label=label)

  ds = ds.map(one_view, num_parallel_calls=_parallel(config),
              deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _options(ds, config), n


def eval_dataset(config: ml_collections.ConfigDict, split: str,
                 batch_size: int, process_index: int | None = None,
                 process_count: int | None = None):
  """One padded pass over this process's share of `split`.

  Every process yields the same number of batches; together they hold every
  example of the split exactly once with mask True (plus padding with mask
  False, label -1, index -1).

  Returns:
    (dataset of {'image': uint8 [L, S, S, 3] centre crops, 'label': int32,
    'mask': bool, 'index': int64 (example index in the split)},
    number of examples of the split, number of batches).
  """
  tf = _tf()
  pi, pc = _process(process_index, process_count)
  local = batch_size // pc
  size = int(config.data.image_size)
  fraction = float(config.data.eval_crop_fraction)
  window = lambda h, w: center_window(h, w, fraction)

  if config.data.source == "tfds":
    builder = tfds_builder(config.data)
    total = tfds_split_size(builder, split)
    sub, _, first = _tfds_process_split(builder, split, pi, pc)
    ds = tf.data.Dataset.zip(_tfds_dataset(builder, sub),
                             tf.data.Dataset.range(first, _INT64_MAX))
    ds = ds.map(lambda ex, i: (ex["data"], ex["label"], i))
    encoded = True
  else:
    s = sources.get_split(config.data, split)
    src = _IndexSource(s)
    total = src.num_examples
    ds = tf.data.Dataset.from_tensor_slices(
        sources.shard_indices(total, pi, pc))
    ds = ds.map(lambda i: (*src.read(i), i))
    encoded = src.encoded

  def center(data, label, i):
    (image,), _ = crops_of(data, encoded, [window], size)
    return dict(image=image, label=label, mask=tf.constant(True), index=i)

  ds = ds.map(center, num_parallel_calls=_parallel(config), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors(dict(
      image=tf.zeros([size, size, 3], tf.uint8), label=tf.constant(-1),
      mask=tf.constant(False), index=tf.constant(-1, tf.int64))).repeat()
  num_batches = device.num_eval_batches(total, local, pc)
  ds = ds.concatenate(pad).batch(local, drop_remainder=True).take(num_batches)
  return _options(ds.prefetch(tf.data.AUTOTUNE), config), total, num_batches


# ---------------------------------------------------------------------------
# Global batches.
# ---------------------------------------------------------------------------


class HostPretrainData:
  """tf.data two-view batches, made global with make_array_from_process_local_data.

  Attributes:
    num_examples: size of the train split (all processes).
    steps_per_epoch: num_examples // batch_size.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               start_step: int = 0, arrays=None):
    sharding.check_batch_size(int(config.batch_size), mesh)
    self._config, self._mesh, self._arrays = config, mesh, arrays
    self.batch_size = int(config.batch_size)
    self._start(start_step)
    self.steps_per_epoch = self.num_examples // self.batch_size

  def _start(self, step: int):
    ds, self.num_examples = pretrain_dataset(self._config, start_step=step,
                                             arrays=self._arrays)
    self._iter = ds.as_numpy_iterator()
    self._next_step = step

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of `step`: {'view1', 'view2': uint8 [B, S, S, 3],
    'label': int32 [B]}, sharded over the mesh's data axis."""
    if step != self._next_step:
      logging.info("Input pipeline: jumping from step %d to %d.",
                   self._next_step, step)
      self._start(step)
    local = next(self._iter)
    self._next_step = step + 1
    return sharding.global_batch(local, self._mesh)


class HostLinearTrainData:
  """tf.data random-crop + flip batches, 'image' float32 in [0, 1] on device."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               batch_size: int, seed: int, start_step: int = 0):
    sharding.check_batch_size(int(batch_size), mesh)
    self._config, self._mesh = config, mesh
    self.batch_size, self._seed = int(batch_size), int(seed)
    self._start(start_step)
    self.steps_per_epoch = self.num_examples // self.batch_size

  def _start(self, step: int):
    ds, self.num_examples = linear_train_dataset(
        self._config, self.batch_size, self._seed, start_step=step)
    self._iter = ds.as_numpy_iterator()
    self._next_step = step

  def batch(self, step: int) -> dict[str, jax.Array]:
    """{'image': f32 [B, S, S, 3] in [0, 1], 'label': int32 [B]}."""
    if step != self._next_step:
      self._start(step)
    local = next(self._iter)
    self._next_step = step + 1
    return device.to_global_float_batch(local, self._mesh)


class HostEvalData:
  """One pass over a split per iteration, as padded global batches."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               split: str, batch_size: int):
    sharding.check_batch_size(int(batch_size), mesh)
    self._mesh = mesh
    self._ds, self.num_examples, self._num_batches = eval_dataset(
        config, split, int(batch_size))

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    for local in self._ds.as_numpy_iterator():
      yield device.to_global_float_batch(local, self._mesh)
