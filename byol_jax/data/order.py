"""Which examples each step reads: seeded epoch permutations, shards, subsets.

Shared by both paths. The stream concatenates per-epoch permutations; step s
covers positions [s B, (s + 1) B), process p of P its p-th P-th of them: a
batch is a pure function of (seed, step), whatever the number of processes.
"""
import functools
import math

import jax
import numpy as np

_PERM_SALT = 0x5EED0001
_SUBSET_SALT = 0x5EED0003


def process(process_index: int | None = None,
            process_count: int | None = None) -> tuple[int, int]:
  """(process index, process count), defaulting to JAX's."""
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _rng(*words: int) -> np.random.Generator:
  return np.random.default_rng([w & 0xFFFFFFFFFFFFFFFF for w in words])


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n examples in `epoch`: int64 [n] (cached, read-only)."""
  perm = _rng(seed, _PERM_SALT, epoch).permutation(n)
  perm.flags.writeable = False
  return perm


def stream_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
  """Example indices of the global batch of `step`: int64 [batch] in [0, n)."""
  pos = step * batch + np.arange(batch, dtype=np.int64)          # [B]
  epoch, j = pos // n, pos % n
  out = np.empty((batch,), np.int64)
  for e in np.unique(epoch):                  # One or two epochs per batch.
    sel = epoch == e
    out[sel] = epoch_permutation(seed, int(e), n)[j[sel]]
  return out


def local_rows(batch: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch."""
  local = batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def num_eval_batches(num_examples: int, local_batch: int,
                     process_count: int) -> int:
  """Batches per process for one padded pass (the same on every process)."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) /
                          local_batch))


def eval_plan(n: int, local_batch: int, process_index: int,
              process_count: int) -> np.ndarray:
  """This process's padded pass: int64 [batches, local_batch] indices, -1 on
  padding."""
  idx = np.arange(process_index, n, process_count, dtype=np.int64)
  rows = num_eval_batches(n, local_batch, process_count)
  out = np.full((rows * local_batch,), -1, np.int64)
  out[:idx.shape[0]] = idx
  return out.reshape(rows, local_batch)


def subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted int64 indices of a seeded subset of about `fraction` of `labels`,
  class-balanced (at least 1 per class) when every label is known."""
  n = labels.shape[0]
  if fraction >= 1.0:
    return np.arange(n, dtype=np.int64)
  rng = _rng(seed, _SUBSET_SALT)
  groups = ([np.flatnonzero(labels == c) for c in np.unique(labels)]
            if np.all(labels >= 0) else [np.arange(n)])
  picked = [rng.permutation(g)[:max(1, round(fraction * g.shape[0]))]
            for g in groups]
  return np.sort(np.concatenate(picked)).astype(np.int64)
