"""Top-1 and top-5 counts of a classifier over one pass of a split.

`evaluate` is the shared loop: it counts hits on device, skipping padding
rows by their mask, so each example of the split counts exactly once
whatever the batch size.
"""
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from byol_jax.core import sharding
from byol_jax.evaluation import knn


def correct_counts(logits: jax.Array, labels: jax.Array,
                   mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Top-1 and top-5 hits of one batch, over its real rows.

  Args:
    logits: [B, C] scores.
    labels: [B] int labels.
    mask: [B] bool, False for padding rows (None: all real).

  Returns:
    {'correct1', 'correct5', 'count'}: int32 scalars (top-5 is top-C when
    C < 5).
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


def evaluate(count_fn: Callable[[Any, dict], dict], variables: Any,
             eval_data: Iterable[dict], mesh: Mesh) -> dict[str, float]:
  """Top-1/top-5 accuracy over one pass of `eval_data`.

  Args:
    count_fn: jitted `(variables, batch) -> correct_counts(...)`.
    variables: its replicated first argument.
    eval_data: one pass of global batches {'image', 'label', 'mask'}.
    mesh: the device mesh.

  Returns:
    {'top1', 'top5': fractions in [0, 1], 'num_examples': int}.
  """
  totals = None
  throttle = jax.default_backend() == "cpu"  # XLA:CPU: a shallow queue.
  for batch in eval_data:
    counts = count_fn(variables, knn.as_global(batch, mesh))
    if throttle and totals is not None:
      jax.block_until_ready(totals)
    # Summed on device: one host read at the end of the pass.
    totals = counts if totals is None else jax.tree.map(jnp.add, totals,
                                                        counts)
  if totals is None:
    raise ValueError("evaluate: the evaluation data is empty.")
  totals = {k: int(sharding.to_host(v)) for k, v in totals.items()}
  n = max(totals["count"], 1)
  return dict(top1=totals["correct1"] / n, top5=totals["correct5"] / n,
              num_examples=totals["count"])
