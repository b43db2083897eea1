"""The kNN monitor: weighted k-nearest-neighbour accuracy on frozen features.

The protocol of InstDisc (Wu et al., 2018), used by most self-supervised
papers as a cheap monitor on CIFAR-sized sets (DESIGN section 3): features are
L2-normalised, each test image takes the k training images of highest cosine
similarity, and neighbour j votes for its label with weight exp(s_j / T).

    features, labels = extract_features(apply_fn, eval_data, mesh)
    preds = knn_predict(train_f, train_y, test_f, num_classes, k=200)
    knn_accuracy(config, encoder_apply, mesh)  # {'top1': ..., 'top5': ...}
"""
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax import sharding

# Test rows whose similarities to the whole bank are held at once; with a
# bank of N training features the similarity block is [chunk, N] floats.
DEFAULT_CHUNK = 256


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array, as NumPy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def as_global(batch: dict, mesh: Mesh) -> dict:
  """`batch` as global arrays sharded on `data` (host arrays are this process's rows)."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return batch
  return sharding.global_batch(batch, mesh)


def to_float_images(images: jax.Array) -> jax.Array:
  """Images as float32 in [0, 1] (uint8 inputs are divided by 255)."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize_images(images: jax.Array) -> jax.Array:
  """The ImageNet mean/std normalisation of `byol_jax.data.augment`."""
  from byol_jax.data import augment  # pylint: disable=g-import-not-at-top
  return augment.normalize(images)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / |x| along the last axis, in float32 (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def make_feature_fn(apply_fn: Callable[..., jax.Array], mesh: Mesh, *,
                    with_variables: bool, normalize: bool = True):
  """Jits images -> L2-normalised features, batch-sharded in and out.

  Args:
    apply_fn: `apply_fn(images)` or, with `with_variables`,
      `apply_fn(variables, images)`; images [B, S, S, 3] normalised, returns
      [B, D].
    mesh: the device mesh.
    with_variables: whether the jitted function takes the (replicated)
      variables as its first argument.
    normalize: apply the ImageNet mean/std before `apply_fn`.

  Returns:
    The jitted `fn([variables,] images) -> features [B, D] float32`.
  """
  def features(variables, images):
    x = to_float_images(images)  # [B, S, S, 3] in [0, 1]
    if normalize:
      x = normalize_images(x)
    y = apply_fn(variables, x) if with_variables else apply_fn(x)  # [B, D]
    return l2_normalize(y)

  batch = sharding.batch_sharding(mesh)
  if with_variables:
    return jax.jit(features, in_shardings=(sharding.replicated(mesh), batch),
                   out_shardings=batch)
  return jax.jit(functools.partial(features, None), in_shardings=(batch,),
                 out_shardings=batch)


def extract_features(apply_fn: Callable[..., jax.Array],
                     eval_data: Iterable[dict], mesh: Mesh,
                     variables: Any = None, *, normalize: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised features of one pass over `eval_data`, padding dropped.

  A closure `apply_fn(images)` is fine for small models; for large ones pass
  the variables explicitly (`apply_fn(variables, images)`), as arrays closed
  over by a jitted function are baked into the program as constants.

  Args:
    apply_fn: `apply_fn(images) -> [B, D]`, or `apply_fn(variables, images)`
      when `variables` is given; images are [B, S, S, 3] normalised float32.
    eval_data: one pass of global batches {'image': [B, S, S, 3] in [0, 1],
      'label': int32 [B], 'mask': bool [B]} (rows with mask False are padding).
    mesh: the device mesh; batches are sharded over its `data` axis.
    variables: optional pytree, replicated and passed to `apply_fn`.
    normalize: apply the ImageNet mean/std to the images first.

  Returns:
    (features float32 [N, D], each row of unit norm; labels int32 [N]) over
    the N real examples, in the order of the pass, as NumPy arrays.
  """
  with_variables = variables is not None
  fn = make_feature_fn(apply_fn, mesh, with_variables=with_variables,
                       normalize=normalize)
  if with_variables:
    variables = jax.device_put(variables, sharding.replicated(mesh))
  feats, labels = [], []
  pending = None  # Fetch batch i while batch i + 1 runs.

  def collect(item):
    f, batch = item
    keep = to_host(batch["mask"]).astype(bool) if "mask" in batch else None
    f = to_host(f)
    y = to_host(batch["label"]).astype(np.int32)
    if keep is not None:
      f, y = f[keep], y[keep]
    feats.append(f)
    labels.append(y)

  for batch in eval_data:
    batch = as_global(batch, mesh)
    args = (variables, batch["image"]) if with_variables else (batch["image"],)
    item = (fn(*args), batch)
    if pending is not None:
      collect(pending)
    pending = item
  if pending is not None:
    collect(pending)
  if not feats:
    raise ValueError("extract_features: the evaluation data is empty.")
  return np.concatenate(feats), np.concatenate(labels)


def _chunk_scores(test_chunk: jax.Array, bank: jax.Array,
                  bank_onehot: jax.Array, k: int,
                  temperature: float) -> jax.Array:
  """Class scores of one chunk of test rows.

  Args:
    test_chunk: [c, D] unit-norm test features.
    bank: [N, D] unit-norm training features.
    bank_onehot: [N, C] one-hot training labels (float32).
    k: neighbours per test row.
    temperature: vote temperature T.

  Returns:
    [c, C]: sum over the k nearest neighbours of exp(sim / T) per class.
  """
  sim = jnp.einsum("cd,nd->cn", test_chunk, bank,
                   precision=jax.lax.Precision.HIGHEST)  # [c, N]
  top_sim, top_idx = jax.lax.top_k(sim, k)               # [c, k], [c, k]
  weights = jnp.exp(top_sim / temperature)               # [c, k]
  votes = jnp.take(bank_onehot, top_idx, axis=0)         # [c, k, C]
  return jnp.einsum("ck,ckl->cl", weights, votes,
                    precision=jax.lax.Precision.HIGHEST)  # [c, C]


@functools.lru_cache(maxsize=32)
def _scores_fn(num_classes: int, k: int, temperature: float, chunk: int,
               mesh: Mesh | None):
  """Jitted (bank, bank_labels, test) -> scores, cached per static setting."""

  def scores(bank, bank_labels, test):
    # bank [N, D], bank_labels [N], test [n_chunks * chunk, D].
    bank = bank.astype(jnp.float32)
    onehot = jax.nn.one_hot(bank_labels, num_classes, dtype=jnp.float32)
    chunks = test.astype(jnp.float32).reshape(-1, chunk, test.shape[-1])
    if mesh is not None:  # Rows of each chunk spread over the devices.
      chunks = jax.lax.with_sharding_constraint(
          chunks, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))
    out = jax.lax.map(
        lambda c: _chunk_scores(c, bank, onehot, k, temperature), chunks)
    return out.reshape(-1, num_classes)  # [n_chunks * chunk, C]

  if mesh is None:
    return jax.jit(scores)
  rep = sharding.replicated(mesh)
  return jax.jit(scores, in_shardings=(rep, rep, rep), out_shardings=rep)


def knn_scores(train_features: Any, train_labels: Any, test_features: Any,
               num_classes: int, k: int = 200, temperature: float = 0.1,
               chunk: int = DEFAULT_CHUNK, mesh: Mesh | None = None
               ) -> jax.Array:
  """Weighted kNN class scores of every test row.

  Args:
    train_features: [N, D] unit-norm features of the bank.
    train_labels: [N] int labels in [0, num_classes).
    test_features: [M, D] unit-norm features to classify.
    num_classes: C.
    k: neighbours (clipped to N).
    temperature: T of the exp(sim / T) vote weights.
    chunk: test rows processed at once (memory is O(chunk * N)).
    mesh: optional mesh; each chunk's rows are then split over its devices
      (chunk is rounded up to a multiple of the device count).

  Returns:
    float32 [M, C]: score[i, c] = sum of exp(s_ij / T) over the k nearest
    neighbours j of test row i whose label is c.
  """
  train_features = jnp.asarray(train_features)
  m = int(np.shape(test_features)[0])
  k = int(min(k, train_features.shape[0]))
  chunk = max(1, min(int(chunk), m))
  if mesh is not None:
    n = mesh.devices.size
    chunk = -(-chunk // n) * n
  padded = -(-m // chunk) * chunk
  test = jnp.asarray(test_features, jnp.float32)
  if padded != m:
    test = jnp.pad(test, ((0, padded - m), (0, 0)))
  fn = _scores_fn(int(num_classes), k, float(temperature), chunk, mesh)
  scores = fn(train_features, jnp.asarray(train_labels, jnp.int32), test)
  return scores[:m]


def knn_predict(train_features: Any, train_labels: Any, test_features: Any,
                num_classes: int, k: int = 200, temperature: float = 0.1,
                chunk: int = DEFAULT_CHUNK, mesh: Mesh | None = None
                ) -> jax.Array:
  """Predicted labels int32 [M] of the weighted kNN vote (see `knn_scores`)."""
  scores = knn_scores(train_features, train_labels, test_features,
                      num_classes, k=k, temperature=temperature, chunk=chunk,
                      mesh=mesh)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
  """Top-k accuracies {'top1': ..., 'top5': ...} of scores [M, C] (k <= C)."""
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  # Rank of the true class: how many classes score strictly higher.
  true = np.take_along_axis(scores, labels[:, None], axis=1)  # [M, 1]
  rank = np.sum(scores > true, axis=1)                         # [M]
  return {f"top{k}": float(np.mean(rank < k))
          for k in ks if k <= scores.shape[1]}


def knn_accuracy(config: ml_collections.ConfigDict,
                 encoder_apply: Callable[..., jax.Array], mesh: Mesh,
                 variables: Any = None, *, batch_size: int | None = None,
                 chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
  """kNN accuracy of the encoder: bank = train split, queries = eval split.

  Both splits are read once in inference (centre-crop) form with
  `data.build_eval`; k and T come from `config.knn`.

  Args:
    config: the run's config (data.*, knn.k, knn.temperature,
      augment.normalize, batch_size).
    encoder_apply: `encoder_apply(images) -> [B, D]` (or
      `encoder_apply(variables, images)` when `variables` is given) on
      normalised images, in inference mode.
    mesh: the device mesh.
    variables: optional variables passed explicitly to `encoder_apply`.
    batch_size: global eval batch (default: config.batch_size).
    chunk: test rows scored at once.

  Returns:
    {'top1': float, 'top5': float (C >= 5), 'num_train': int,
    'num_test': int}.
  """
  from byol_jax import data  # pylint: disable=g-import-not-at-top
  batch_size = int(batch_size or config.batch_size)
  normalize = bool(config.augment.get("normalize", True))

  def features(split):
    eval_data = data.build_eval(config, mesh, split, batch_size)
    return extract_features(encoder_apply, eval_data, mesh, variables,
                            normalize=normalize)

  train_f, train_y = features(config.data.train_split)
  test_f, test_y = features(config.data.eval_split)
  scores = knn_scores(train_f, train_y, test_f, config.data.num_classes,
                      k=config.knn.k, temperature=config.knn.temperature,
                      chunk=chunk, mesh=mesh)
  result: dict[str, Any] = topk_accuracy(to_host(scores), test_y)
  result.update(num_train=int(train_f.shape[0]), num_test=int(test_f.shape[0]))
  return result
