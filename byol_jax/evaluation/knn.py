"""The kNN monitor's vote: weighted k-nearest-neighbour class scores.

The protocol of InstDisc (Wu et al., 2018), used by most self-supervised
papers as a cheap monitor on CIFAR-sized sets (DESIGN section 3): features are
L2-normalised, each test image takes the k training images of highest cosine
similarity, and neighbour j votes for its label with weight exp(s_j / T).

    features, labels = extract_features(apply_fn, eval_data, mesh, variables)
    preds = knn_predict(train_f, train_y, test_f, num_classes, k=200)

The bank is sharded: each device holds its own rows (those it computed),
scores every query against them, keeps its local top-k, and the owners of
the queries merge the devices' candidates (`sharded_knn`). A device's memory
is O(N / devices), so an ImageNet-sized bank fits however many devices share
it. `evaluation.monitor.Monitor` runs it during training, built once per run.
"""
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.core.methods import network

# Test rows (over all devices) whose similarities to the bank are held at
# once; with N bank rows a device's similarity block is [chunk, N / devices].
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


def _merge_votes(sim: jax.Array, labels: jax.Array, k: int,
                 num_classes: int, temperature: float) -> jax.Array:
  """Class scores [c, C] from candidate neighbours sim, labels [c, K] (K >= k)."""
  top_sim, pos = jax.lax.top_k(sim, k)                   # [c, k]
  top_y = jnp.take_along_axis(labels, pos, axis=1)       # [c, k]
  weights = jnp.exp(top_sim / temperature)               # [c, k]; 0 for -inf
  votes = jax.nn.one_hot(top_y, num_classes, dtype=jnp.float32)  # [c, k, C]
  return jnp.einsum("ck,ckl->cl", weights, votes,
                    precision=jax.lax.Precision.HIGHEST)  # [c, C]


def _local_scores(bank, bank_y, bank_valid, queries, *, devices: int,
                  num_classes: int, k: int, temperature: float, chunk: int):
  """One device's part of the sharded vote (inside `shard_map`).

  Each device holds its own rows of the bank and of the queries. Per chunk
  of query rows: every device's chunk is gathered (features only), scored
  against the local bank rows, cut to the local top-k, and each device's
  candidates go back to the device that owns the query (all-to-all), which
  merges the devices' candidates into the global top-k and votes.

  Args:
    bank: [nb, b, D] this device's bank rows (b = global rows / devices).
    bank_y: [nb, b] their labels.
    bank_valid: [nb, b] False for padding rows (they never vote).
    queries: [nq, q, D] this device's query rows.
    devices: devices on the `data` axis.
    num_classes: C.
    k: neighbours per query (at most the bank's valid rows).
    temperature: T.
    chunk: query rows per device scored at once.

  Returns:
    [nq, q, C] class scores of this device's query rows.
  """
  dim = bank.shape[-1]
  bank = bank.reshape(-1, dim).astype(jnp.float32)        # [Nl, D]
  bank_y = bank_y.reshape(-1).astype(jnp.int32)           # [Nl]
  bank_valid = bank_valid.reshape(-1).astype(bool)        # [Nl]
  nq, q = queries.shape[:2]
  rows = queries.reshape(-1, dim).astype(jnp.float32)     # [Ml, D]
  padded = -(-rows.shape[0] // chunk) * chunk
  rows = jnp.pad(rows, ((0, padded - rows.shape[0]), (0, 0)))
  k_local = min(k, bank.shape[0])

  def one_chunk(mine):                                    # [c, D]
    every = jax.lax.all_gather(mine, sharding.DATA_AXIS,
                               tiled=True)                # [n c, D]
    sim = jnp.einsum("md,nd->mn", every, bank,
                     precision=jax.lax.Precision.HIGHEST)  # [n c, Nl]
    sim = jnp.where(bank_valid[None, :], sim, -jnp.inf)
    top_sim, idx = jax.lax.top_k(sim, k_local)            # [n c, kl]
    top_y = jnp.take(bank_y, idx, axis=0)                 # [n c, kl]
    # Block j of the n row blocks belongs to device j: send it there, and
    # receive every device's candidates for this device's rows.
    back = lambda x: jax.lax.all_to_all(  # noqa: E731
        x.reshape(devices, chunk, k_local), sharding.DATA_AXIS, 0, 0)
    cand_sim = back(top_sim).transpose(1, 0, 2).reshape(chunk, -1)
    cand_y = back(top_y).transpose(1, 0, 2).reshape(chunk, -1)  # [c, n kl]
    return _merge_votes(cand_sim, cand_y, k, num_classes, temperature)

  scores = jax.lax.map(one_chunk, rows.reshape(-1, chunk, dim))
  scores = scores.reshape(padded, num_classes)[:nq * q]
  return scores.reshape(nq, q, num_classes)


def _local_counts(scores, labels, mask):
  """Top-1/top-5 hits {'correct1', 'correct5', 'count'} summed over devices."""
  scores = scores.reshape(-1, scores.shape[-1])           # [M, C]
  labels = labels.reshape(-1).astype(jnp.int32)
  mask = mask.reshape(-1).astype(bool) & (labels >= 0)
  true = jnp.take_along_axis(scores, jnp.maximum(labels, 0)[:, None], axis=1)
  rank = jnp.sum(scores > true, axis=1)  # [M] classes scoring above the truth
  local = dict(correct1=jnp.sum((rank < 1) & mask, dtype=jnp.int32),
               correct5=jnp.sum((rank < 5) & mask, dtype=jnp.int32),
               count=jnp.sum(mask, dtype=jnp.int32))
  return jax.lax.psum(local, sharding.DATA_AXIS)


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """[n, B, ...] stacks of batches, each batch's rows split over `data`."""
  return NamedSharding(mesh, P(None, sharding.DATA_AXIS))


@functools.lru_cache(maxsize=32)
def sharded_knn(mesh: Mesh, num_classes: int, k: int, temperature: float,
                chunk: int = DEFAULT_CHUNK, counts: bool = False):
  """The jitted sharded kNN program; every array is [n, B, ...] on `rows_sharding`.

  The bank stays where its features were computed: each device holds only
  its rows (memory O(N / devices)), and no feature array is replicated.

  Args:
    mesh: the device mesh.
    num_classes: C.
    k: neighbours per query (at most the bank's valid rows).
    temperature: T.
    chunk: query rows scored at once over all devices (rounded up to a
      multiple of the device count); the similarity block of a device is
      [chunk, N / devices] floats.
    counts: return the queries' top-1/top-5 hit counts instead of scores.

  Returns:
    `fn(bank [nb, B, D], bank_labels [nb, B], bank_valid [nb, B], queries
    [nq, Q, D])` -> scores [nq, Q, C] (counts=False), or `fn(...,
    query_labels [nq, Q], query_mask [nq, Q])` -> {'correct1', 'correct5',
    'count'} int32 scalars, replicated (counts=True).
  """
  devices = mesh.devices.size
  local = functools.partial(
      _local_scores, devices=devices, num_classes=num_classes, k=k,
      temperature=temperature, chunk=max(1, -(-chunk // devices)))
  rows = P(None, sharding.DATA_AXIS)
  if counts:
    body = lambda b, by, bv, q, qy, qm: _local_counts(  # noqa: E731
        local(b, by, bv, q), qy, qm)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(rows,) * 6, out_specs=P())
    return jax.jit(fn, in_shardings=(rows_sharding(mesh),) * 6,
                   out_shardings=sharding.replicated(mesh))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows)
  return jax.jit(fn, in_shardings=(rows_sharding(mesh),) * 4,
                 out_shardings=rows_sharding(mesh))


def _as_rows(x: Any, n: int, fill: Any = 0) -> tuple[np.ndarray, int]:
  """[N, ...] -> ([1, N rounded up to a multiple of n, ...], N)."""
  x = np.asarray(x)
  pad = -len(x) % n
  x = np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
  return x[None], len(x) - pad


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
    chunk: test rows processed at once (memory is O(chunk * N / devices)).
    mesh: the devices the bank and the test rows are split over (default:
      the first device).

  Returns:
    float32 [M, C]: score[i, c] = sum of exp(s_ij / T) over the k nearest
    neighbours j of test row i whose label is c.
  """
  mesh = mesh or sharding.make_mesh(jax.devices()[:1])
  n = mesh.devices.size
  bank, size = _as_rows(np.asarray(train_features, np.float32), n)
  bank_y, _ = _as_rows(np.asarray(train_labels, np.int32), n)
  valid, _ = _as_rows(np.ones(size, bool), n, False)
  test, m = _as_rows(np.asarray(test_features, np.float32), n)
  fn = sharded_knn(mesh, int(num_classes), int(min(k, size)),
                   float(temperature), int(chunk))
  put = lambda x: jax.device_put(x, rows_sharding(mesh))  # noqa: E731
  return fn(put(bank), put(bank_y), put(valid), put(test))[0, :m]


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
