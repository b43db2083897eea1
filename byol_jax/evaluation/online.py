"""Top-1/top-5 hit counts of a classifier, on device, padding rows skipped."""
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from byol_jax.core import sharding


def as_global(batch: dict, mesh: Mesh) -> dict:
  """`batch` as global arrays on `data` (host arrays: this process's rows)."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return batch
  return sharding.global_batch(batch, mesh)


def correct_counts(logits: jax.Array, labels: jax.Array,
                   mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """{'correct1', 'correct5', 'count'} (int32) of logits [B, C], labels [B].

  Rows with a negative label or mask [B] False (padding) do not count;
  top-5 is top-C when C < 5.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  if mask is None:
    mask = jnp.ones(labels.shape, bool)
  true = jnp.take_along_axis(logits, labels[:, None], axis=1)  # [B, 1]
  rank = jnp.sum(logits > true, axis=1)  # [B] classes scoring above the truth
  mask = mask.astype(bool) & (labels >= 0)
  return dict(correct1=jnp.sum((rank < 1) & mask, dtype=jnp.int32),
              correct5=jnp.sum((rank < 5) & mask, dtype=jnp.int32),
              count=jnp.sum(mask, dtype=jnp.int32))


def accuracy(totals: dict[str, jax.Array]) -> dict[str, Any]:
  """{'top1', 'top5': fractions, 'num_examples'} of summed `correct_counts`."""
  t = {k: int(sharding.to_host(v)) for k, v in totals.items()}
  n = max(t["count"], 1)
  return dict(top1=t["correct1"] / n, top5=t["correct5"] / n,
              num_examples=t["count"])


def evaluate(count_fn: Callable[[Any, dict], dict], variables: Any,
             eval_data: Iterable[dict], mesh: Mesh) -> dict[str, Any]:
  """`accuracy` of a jitted `count_fn(variables, batch)` over one pass."""
  totals = None
  throttle = jax.default_backend() == "cpu"  # XLA:CPU: a shallow queue.
  for batch in eval_data:
    counts = count_fn(variables, as_global(batch, mesh))
    if throttle and totals is not None:
      jax.block_until_ready(totals)
    # Summed on device: one host read at the end of the pass.
    totals = counts if totals is None else jax.tree.map(jnp.add, totals,
                                                        counts)
  if totals is None:
    raise ValueError("evaluate: the evaluation data is empty.")
  return accuracy(totals)
