"""The kNN monitor's vote: weighted k-nearest-neighbour class scores.

InstDisc's protocol (Wu et al., 2018; DESIGN section 3): on L2-normalised
features, each test image takes the k training images of highest cosine
similarity, and neighbour j votes for its label with weight exp(s_j / T).

    features, labels = extract_features(apply_fn, eval_data, mesh, variables)
    preds = knn_predict(train_f, train_y, test_f, num_classes, k=200)

The bank is sharded (`sharded_knn`): each device holds the rows it computed,
scores every query against them and keeps its local top-k; the queries'
owners merge the candidates. A device's memory is O(N / devices).
"""
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax.core import sharding
from byol_jax.core.methods import network
from byol_jax.data import augment
from byol_jax.evaluation import online

# Test rows (over all devices) whose similarities to the bank are held at
# once; with N bank rows a device's similarity block is [chunk, N / devices].
DEFAULT_CHUNK = 256


def extract_features(apply_fn: Callable[[Any, jax.Array], jax.Array],
                     eval_data: Iterable[dict], mesh: Mesh, variables: Any,
                     *, normalize: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised features of one pass over `eval_data`, padding dropped.

  Args:
    apply_fn: `apply_fn(variables, images [B, S, S, 3] f32) -> [B, D]`.
    eval_data: one pass of batches {'image': [B, S, S, 3] in [0, 1],
      'label': int32 [B], 'mask': bool [B] (False: padding)}.
    mesh: the device mesh; batches are sharded over its `data` axis.
    variables: pytree passed (replicated) to `apply_fn`.
    normalize: apply the ImageNet mean/std to the images first.

  Returns:
    NumPy (features f32 [N, D] of unit norm, labels int32 [N]) of the N
    real examples, in the order of the pass.
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
    batch = online.as_global(batch, mesh)
    keep = sharding.to_host(batch["mask"]).astype(bool)
    feats.append(sharding.to_host(fn(variables, batch["image"]))[keep])
    labels.append(sharding.to_host(batch["label"]).astype(np.int32)[keep])
  if not feats:
    raise ValueError("extract_features: the evaluation data is empty.")
  return np.concatenate(feats), np.concatenate(labels)


def _local_scores(bank, bank_y, bank_valid, queries, *, devices: int,
                  num_classes: int, k: int, temperature: float, chunk: int):
  """One device's class scores [nq, q, C] of its queries (in `shard_map`).

  Per chunk of query rows: every device's chunk is gathered (features
  only), scored against the local bank rows, cut to the local top-k, and
  the candidates go back to the query's device (all-to-all), which merges
  them into the global top-k and votes.

  Args:
    bank: [nb, b, D] this device's bank rows (b = global rows / devices).
    bank_y: [nb, b] their labels.
    bank_valid: [nb, b] False for padding rows (they never vote).
    queries: [nq, q, D] this device's query rows.
    devices: devices on the `data` axis.
    num_classes, k, temperature: C, neighbours per query (at most the
      bank's valid rows), T.
    chunk: query rows per device scored at once.
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
    top_sim, pos = jax.lax.top_k(cand_sim, k)                   # [c, k]
    top_y = jnp.take_along_axis(cand_y, pos, axis=1)            # [c, k]
    weights = jnp.exp(top_sim / temperature)           # [c, k]; 0 for -inf
    votes = jax.nn.one_hot(top_y, num_classes, dtype=jnp.float32)
    return jnp.einsum("ck,ckl->cl", weights, votes,    # [c, C]
                      precision=jax.lax.Precision.HIGHEST)

  scores = jax.lax.map(one_chunk, rows.reshape(-1, chunk, dim))
  scores = scores.reshape(padded, num_classes)[:nq * q]
  return scores.reshape(nq, q, num_classes)


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """[n, B, ...] stacks of batches, each batch's rows split over `data`."""
  return NamedSharding(mesh, P(None, sharding.DATA_AXIS))


@functools.lru_cache(maxsize=32)
def sharded_knn(mesh: Mesh, num_classes: int, k: int, temperature: float,
                chunk: int = DEFAULT_CHUNK, counts: bool = False):
  """The jitted sharded kNN program; every array is [n, B, ...] on `rows_sharding`.

  The bank stays where its features were computed: no feature array is
  replicated.

  Args:
    mesh: the device mesh.
    num_classes, k, temperature: C, neighbours per query (at most the
      bank's valid rows), T.
    chunk: query rows scored at once over all devices (rounded up to the
      device count); a device's similarity block is [chunk, N / devices].
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

  def counted(bank, bank_y, bank_valid, queries, labels, mask):
    scores = local(bank, bank_y, bank_valid, queries)  # [nq, q, C]
    return jax.lax.psum(online.correct_counts(
        scores.reshape(-1, num_classes), labels.reshape(-1),
        mask.reshape(-1)), sharding.DATA_AXIS)

  rows = P(None, sharding.DATA_AXIS)
  out = P() if counts else rows
  n_in = 6 if counts else 4
  fn = jax.shard_map(counted if counts else local, mesh=mesh,
                     in_specs=(rows,) * n_in, out_specs=out)
  return jax.jit(fn, in_shardings=(rows_sharding(mesh),) * n_in,
                 out_shardings=NamedSharding(mesh, out))


def knn_scores(train_features: Any, train_labels: Any, test_features: Any,
               num_classes: int, k: int = 200, temperature: float = 0.1,
               chunk: int = DEFAULT_CHUNK, mesh: Mesh | None = None
               ) -> jax.Array:
  """Weighted kNN class scores of every test row.

  Args:
    train_features, train_labels: the bank, unit-norm [N, D] and int [N].
    test_features: [M, D] unit-norm features to classify.
    num_classes, k, temperature: C, neighbours (clipped to N), T.
    chunk: test rows processed at once.
    mesh: the devices the bank and test rows are split over (default: the
      first device).

  Returns:
    float32 [M, C]: score[i, c] = sum of exp(s_ij / T) over the k nearest
    neighbours j of test row i whose label is c.
  """
  mesh = mesh or sharding.make_mesh(jax.devices()[:1])

  def rows(x, dtype, fill=0):  # [N, ...] -> [1, N padded to the devices, ...]
    x = np.asarray(x, dtype)
    pad = np.full((-len(x) % mesh.devices.size,) + x.shape[1:], fill, dtype)
    return jax.device_put(np.concatenate([x, pad])[None], rows_sharding(mesh))

  size = len(train_labels)
  fn = sharded_knn(mesh, int(num_classes), int(min(k, size)),
                   float(temperature), int(chunk))
  return fn(rows(train_features, np.float32), rows(train_labels, np.int32),
            rows(np.ones(size, bool), bool, False),
            rows(test_features, np.float32))[0, :len(test_features)]


def knn_predict(*args, **kwargs) -> jax.Array:
  """Predicted labels int32 [M] of `knn_scores(*args, **kwargs)`."""
  return jnp.argmax(knn_scores(*args, **kwargs), axis=-1).astype(jnp.int32)


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
