"""The kNN monitor's vote: weighted k-nearest-neighbour class scores.

The protocol of InstDisc (Wu et al., 2018), used by most self-supervised
papers as a cheap monitor on CIFAR-sized sets (DESIGN section 3): features are
L2-normalised, each test image takes the k training images of highest cosine
similarity, and neighbour j votes for its label with weight exp(s_j / T).

    features, labels = extract_features(apply_fn, eval_data, mesh, variables)
    preds = knn_predict(train_f, train_y, test_f, num_classes, k=200)

`evaluation.monitor.Monitor` runs it during training, built once per run.
"""
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax import sharding
from byol_jax.data import augment
from byol_jax.methods import network

# Test rows whose similarities to the whole bank are held at once; with a
# bank of N training features the similarity block is [chunk, N] floats.
DEFAULT_CHUNK = 256


def as_global(batch: dict, mesh: Mesh) -> dict:
  """`batch` as global arrays sharded on `data` (host arrays are this process's rows)."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return batch
  return sharding.global_batch(batch, mesh)


def extract_features(apply_fn: Callable[[Any, jax.Array], jax.Array],
                     eval_data: Iterable[dict], mesh: Mesh, variables: Any,
                     *, normalize: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised features of one pass over `eval_data`, padding dropped.

  Args:
    apply_fn: `apply_fn(variables, images) -> [B, D]`; images are
      [B, S, S, 3] float32, ImageNet-normalised when `normalize`.
    eval_data: one pass of global batches {'image': [B, S, S, 3] in [0, 1],
      'label': int32 [B], 'mask': bool [B]} (rows with mask False are padding).
    mesh: the device mesh; batches are sharded over its `data` axis.
    variables: pytree passed (replicated) to `apply_fn`.
    normalize: apply the ImageNet mean/std to the images first.

  Returns:
    (features float32 [N, D], each row of unit norm; labels int32 [N]) over
    the N real examples, in the order of the pass, as NumPy arrays.
  """
  def features(v, images):
    x = augment.to_float(images)                       # [B, S, S, 3]
    x = augment.normalize(x) if normalize else x
    return network.l2_normalize(apply_fn(v, x))        # [B, D]

  rep, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  fn = jax.jit(features, in_shardings=(rep, batch_sharding),
               out_shardings=batch_sharding)
  variables = jax.device_put(variables, rep)
  feats, labels = [], []
  for batch in eval_data:
    batch = as_global(batch, mesh)
    keep = sharding.to_host(batch["mask"]).astype(bool)
    feats.append(sharding.to_host(fn(variables, batch["image"]))[keep])
    labels.append(sharding.to_host(batch["label"]).astype(np.int32)[keep])
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
