"""The evaluations run during pretraining, built and compiled once per run.

The online classifier's top-1/top-5 on the eval split and the kNN monitor
(bank: the train split; queries: the eval split) share one forward pass.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax import data
from byol_jax import progress
from byol_jax.core import models
from byol_jax.core import sharding
from byol_jax.core.methods import network
from byol_jax.data import augment
from byol_jax.evaluation import knn
from byol_jax.evaluation import online


class Monitor:
  """Online-classifier accuracy and kNN accuracy of an encoder."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *,
               batch_size: int | None = None):
    """Builds the eval pipelines and programs; no classes: no evaluation.

    `batch_size`: the global eval batch (default: config.eval_batch_size,
    else config.batch_size).
    """
    # XLA:CPU's simulated devices can deadlock on a deep queue of
    # collectives: there, one batch in flight at a time.
    self._throttle = jax.default_backend() == "cpu"
    if config.data.num_classes < 0 or not config.data.eval_split:
      config = data.resolve(config)  # Classes and eval split from the data.
    self._num_classes = c = int(config.data.num_classes)
    self.enabled = c > 0 and bool(config.data.eval_split)
    self.knn_on_target = c > 0 and bool(config.knn.get("target", False))
    self._stacks, self._bank = {}, None
    if not self.enabled:
      return
    batch_size = sharding.fit_batch_size(
        batch_size or config.get("eval_batch_size") or config.batch_size, mesh)
    self._queries = data.build_eval(config, mesh, config.data.eval_split,
                                    batch_size)
    # A stand-in classifier where there is none (a target encoder): one
    # signature, one compilation; its counts are not reported.
    dim = models.representation_dim(config.model.depth, config.model.width,
                                    config.model.num_filters)
    self._no_classifier = jax.device_put(
        {"kernel": np.zeros((dim, c), np.float32),
         "bias": np.zeros((c,), np.float32)}, sharding.replicated(mesh))
    self._forward = forward_fn(config, mesh)
    if not config.knn.get("enabled"):
      return
    self._bank = data.build_eval(config, mesh, config.data.train_split,
                                 batch_size)
    k = min(config.knn.k, self._bank.num_examples)
    if k < config.knn.k:
      progress.say(f"kNN monitor: k={k} neighbours instead of "
                   f"{config.knn.k}, the size of its bank.")
    # Bank and queries stay where they were computed, as [batches, B, ...]
    # stacks (rows on `data`); only the hit counts are read back.
    self._stacks = {name: (len(batches), batches.batch_size, dim)
                    for name, batches in (("bank", self._bank),
                                          ("queries", self._queries))}
    self._empty, self._store = stack_fns(mesh)
    self._knn_counts = knn.sharded_knn(mesh, c, int(k),
                                       float(config.knn.temperature),
                                       counts=True)

  def __call__(self, encoder_vars: Any, classifier_params: Any = None,
               prefix: str = "eval/") -> dict[str, float]:
    """Evaluates the encoder's {'params', 'batch_stats'}.

    Returns:
      {prefix + 'online_top1', 'online_top5' (given `classifier_params`),
      'knn_top1', 'knn_top5' (kNN enabled)}: fractions in [0, 1].
    """
    if not self.enabled:
      return {}
    scored = classifier_params is not None
    if not scored:
      classifier_params = self._no_classifier
    totals, previous = None, None
    stacks = {name: self._empty(*shape)
              for name, shape in self._stacks.items()}
    what = prefix.rstrip("/_")
    for name, batches, label in (
        ("queries", self._queries, "{} on {} images"),
        ("bank", self._bank, "{}: kNN bank of {} images")):
      if batches is None:
        continue
      label = label.format(what, batches.num_examples)
      for i, batch in enumerate(progress.track(batches, label)):
        feats, counts = self._forward(encoder_vars, classifier_params, batch)
        if self._throttle and previous is not None:
          jax.block_until_ready(previous)  # XLA:CPU: a shallow queue.
        previous = counts
        if scored and name == "queries":
          totals = counts if totals is None else jax.tree.map(
              jnp.add, totals, counts)
        if stacks:
          stacks[name] = self._store(stacks[name], feats, batch["label"],
                                     batch["mask"], i)
          previous = stacks[name][0]
    hits = {"online": totals}
    if stacks:
      hits["knn"] = self._knn_counts(*stacks["bank"], *stacks["queries"])
    results = {}
    for kind, counts in hits.items():
      if counts is not None:
        acc = online.accuracy(counts)
        results[f"{prefix}{kind}_top1"] = acc["top1"]
        if self._num_classes >= 5:
          results[f"{prefix}{kind}_top5"] = acc["top5"]
    return results


def forward_fn(config: ml_collections.ConfigDict, mesh: Mesh,
               encoder: nn.Module | None = None):
  """Jitted `(encoder_vars, classifier_params, batch) -> (features, counts)`.

  Unit-norm features [B, D] of `encoder` (default: the config's) in
  inference mode, rows on `data`, and the replicated `online.correct_counts`
  of a linear classifier on them.
  """
  encoder = encoder or network.make_encoder(config)
  classifier = nn.Dense(int(config.data.num_classes), name="classifier")
  normalize = bool(config.augment.get("normalize", True))

  def forward(encoder_vars, classifier_params, batch):
    x = augment.to_float(batch["image"])             # [B, S, S, 3] in [0, 1]
    x = augment.normalize(x) if normalize else x
    y = encoder.apply(encoder_vars, x, train=False)  # [B, D]
    logits = classifier.apply({"params": classifier_params}, y)  # [B, C]
    return network.l2_normalize(y), online.correct_counts(
        logits, batch["label"], batch["mask"])

  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(forward, in_shardings=(rep, rep, rows),
                 out_shardings=(rows, rep))


def stack_fns(mesh: Mesh):
  """Jitted `empty(n, B, D)` and `store(stack, feats, labels, mask, i)`.

  A stack is (features [n, B, D], labels [n, B], mask [n, B]) on
  `knn.rows_sharding`; `store` writes batch i in place (donated).
  """
  stacked, rows = knn.rows_sharding(mesh), sharding.batch_sharding(mesh)

  def empty(n, b, dim):
    return (jnp.zeros((n, b, dim), jnp.float32),
            jnp.zeros((n, b), jnp.int32), jnp.zeros((n, b), bool))

  def store(stack, feats, labels, mask, i):
    new = (feats, labels.astype(jnp.int32), mask.astype(bool))
    return tuple(jax.lax.dynamic_update_index_in_dim(s, r, i, 0)
                 for s, r in zip(stack, new))

  return (jax.jit(empty, static_argnums=(0, 1, 2),
                  out_shardings=(stacked,) * 3),
          jax.jit(store, in_shardings=((stacked,) * 3, rows, rows, rows, None),
                  out_shardings=(stacked,) * 3, donate_argnums=(0,)))
