"""Accuracy of a classifier over one pass of an evaluation split.

`classifier_accuracy` scores the online linear classifier that every method
trains jointly (on the stop-gradient of the representation) with the network
in inference mode. `evaluate` is the shared loop: it counts top-1 and top-5
hits on device, skipping padding rows by their mask, so each example of the
split counts exactly once whatever the batch size.
"""
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from byol_jax import sharding
from byol_jax.evaluation import knn

LogitsFn = Callable[[Any, jax.Array], jax.Array]


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
  mask = mask.astype(bool)
  return dict(correct1=jnp.sum((rank < 1) & mask, dtype=jnp.int32),
              correct5=jnp.sum((rank < 5) & mask, dtype=jnp.int32),
              count=jnp.sum(mask, dtype=jnp.int32))


def make_eval_step(logits_fn: LogitsFn, mesh: Mesh, *,
                   normalize: bool = True):
  """Jits (variables, batch) -> hit counts; batch sharded, variables replicated.

  Args:
    logits_fn: `logits_fn(variables, images) -> [B, C]`, images normalised.
    mesh: the device mesh.
    normalize: apply the ImageNet mean/std to the [0, 1] images first.
  """
  def eval_step(variables, batch):
    x = knn.to_float_images(batch["image"])  # [B, S, S, 3] in [0, 1]
    if normalize:
      x = knn.normalize_images(x)
    logits = logits_fn(variables, x)  # [B, C]
    return correct_counts(logits, batch["label"], batch.get("mask"))

  rep = sharding.replicated(mesh)
  return jax.jit(eval_step,
                 in_shardings=(rep, sharding.batch_sharding(mesh)),
                 out_shardings=rep)


def evaluate(eval_step, variables: Any, eval_data: Iterable[dict],
             mesh: Mesh) -> dict[str, float]:
  """Top-1/top-5 accuracy of `eval_step` (from `make_eval_step`) over one pass.

  Returns:
    {'top1', 'top5': fractions in [0, 1], 'num_examples': int}.
  """
  variables = jax.device_put(variables, sharding.replicated(mesh))
  totals = dict(correct1=0, correct5=0, count=0)
  pending = None  # Fetch batch i's counts while batch i + 1 runs.
  for batch in eval_data:
    counts = eval_step(variables, knn.as_global(batch, mesh))
    if pending is not None:
      for k, v in pending.items():
        totals[k] += int(knn.to_host(v))
    pending = counts
  if pending is None:
    raise ValueError("evaluate: the evaluation data is empty.")
  for k, v in pending.items():
    totals[k] += int(knn.to_host(v))
  n = max(totals["count"], 1)
  return dict(top1=totals["correct1"] / n, top5=totals["correct5"] / n,
              num_examples=totals["count"])


def classifier_accuracy(config: ml_collections.ConfigDict, model: Any,
                        variables: Any, mesh: Mesh, split: str | None = None,
                        *, batch_size: int | None = None) -> dict[str, float]:
  """Accuracy of the online classifier, network in inference mode.

  Args:
    config: the run's config (data.*, augment.normalize, batch_size).
    model: the method's `Network` (its output has 'logits').
    variables: {'params', 'batch_stats'} of the online network.
    mesh: the device mesh.
    split: the split to score (default: config.data.eval_split).
    batch_size: global eval batch (default: config.batch_size).

  Returns:
    {'top1', 'top5' (when num_classes >= 5), 'num_examples'}.
  """
  from byol_jax import data  # pylint: disable=g-import-not-at-top
  split = split or config.data.eval_split
  batch_size = int(batch_size or config.batch_size)

  def logits_fn(v, x):
    return model.apply(v, x, train=False)["logits"]

  eval_step = make_eval_step(
      logits_fn, mesh, normalize=bool(config.augment.get("normalize", True)))
  eval_data = data.build_eval(config, mesh, split, batch_size)
  result = evaluate(eval_step, variables, eval_data, mesh)
  if config.data.num_classes < 5:
    result.pop("top5")
  return result
