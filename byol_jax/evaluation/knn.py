"""Weighted kNN class scores (InstDisc, Wu et al., 2018; DESIGN section 3).

Each L2-normalised test feature takes the k bank rows of highest cosine
similarity; neighbour j votes for its label with weight exp(s_j / T). The
bank stays sharded: each device keeps its rows' top-k per query and the
queries' owners merge the candidates, so a device holds O(N / devices).
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

# Query rows (all devices) scored at once: a device's block is [chunk, N / n].
DEFAULT_CHUNK = 256


def extract_features(apply_fn: Callable[[Any, jax.Array], jax.Array],
                     eval_data: Iterable[dict], mesh: Mesh, variables: Any,
                     *, normalize: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """NumPy (unit-norm features [N, D], labels [N]) of one pass, no padding.

  `apply_fn(variables, images [B, S, S, 3]) -> [B, D]`; `eval_data` yields
  {'image' in [0, 1], 'label', 'mask' (False: padding)}; `normalize` applies
  the ImageNet mean/std first.
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

  Per chunk of query rows, all devices' chunks are gathered, scored against
  the local bank [nb, b, D] (padding rows: `bank_valid` False), cut to the
  local top-k, and sent back to their device (all-to-all), which merges the
  candidates into the global top-k and votes.
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
  """The jitted sharded kNN; every array is [n, B, ...] on `rows_sharding`.

  `k` is at most the bank's valid rows; `chunk` query rows (over all
  devices) are scored at once.

  Returns:
    `fn(bank [nb, B, D], bank_labels, bank_valid, queries [nq, Q, D])` ->
    scores [nq, Q, C], or with `counts`, `fn(..., query_labels, query_mask)`
    -> replicated `online.correct_counts` of the queries.
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
  """Weighted kNN class scores [M, C] of unit-norm test rows [M, D].

  score[i, c] sums exp(s_ij / T) over the k nearest bank rows j of row i
  with label c; `mesh` splits the rows (default: the first device).
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
