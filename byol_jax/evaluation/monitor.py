"""The evaluations run during pretraining, built and compiled once per run.

- The online classifier (trained jointly on the stop-gradient of the
  representation): top-1 and top-5 on the eval split, network in inference
  mode.
- The kNN monitor: the train split's features are the bank, the eval split's
  the queries (k and T from `config.knn`).

One compiled forward pass serves both: the encoder in inference mode gives
the L2-normalised features and the classifier's hit counts of a batch. The
input pipelines and jitted functions are built in `__init__`; each call
only runs them, so periodic evaluations compile nothing new.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from byol_jax import data
from byol_jax.core import models
from byol_jax import progress
from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.evaluation import knn
from byol_jax.evaluation import online
from byol_jax.core.methods import network


class Monitor:
  """Online-classifier accuracy and kNN accuracy of an encoder."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *,
               batch_size: int | None = None):
    """Builds the eval pipelines and the compiled forward pass.

    Args:
      config: the run's resolved config (model, data.*, knn.*,
        augment.normalize); `data.num_classes` 0 turns both evaluations off.
      mesh: the device mesh.
      batch_size: global eval batch (default: config.batch_size), rounded up
        to a multiple of the device count.
    """
    self._mesh = mesh
    # XLA:CPU's simulated devices can deadlock on a deep queue of
    # collectives: there, one batch in flight at a time.
    self._throttle = jax.default_backend() == "cpu"
    if config.data.num_classes < 0 or not config.data.eval_split:
      config = data.resolve(config)  # Classes and eval split from the data.
    self._num_classes = int(config.data.num_classes)
    self._knn = dict(config.knn) if self._num_classes > 0 else {}
    self.enabled = self._num_classes > 0 and bool(config.data.eval_split)
    self.knn_on_target = bool(self._knn.get("target", False))
    if not self.enabled:
      return
    batch_size = sharding.fit_batch_size(batch_size or config.batch_size,
                                         mesh)
    self._queries = data.build_eval(config, mesh, config.data.eval_split,
                                    batch_size)
    self._bank = (data.build_eval(config, mesh, config.data.train_split,
                                  batch_size)
                  if self._knn.get("enabled") else None)
    if self._bank is not None and self._knn["k"] > self._bank.num_examples:
      progress.say(f"kNN monitor: k={self._bank.num_examples} neighbours "
                   f"instead of {self._knn['k']}, the size of its bank.")
      self._knn["k"] = self._bank.num_examples
    rep = sharding.replicated(mesh)
    # A stand-in classifier where there is none (a target encoder): one
    # signature, one compilation; its counts are not reported.
    dim = models.representation_dim(config.model.depth, config.model.width,
                                    config.model.num_filters)
    self._no_classifier = jax.device_put({
        "kernel": np.zeros((dim, self._num_classes), np.float32),
        "bias": np.zeros((self._num_classes,), np.float32)}, rep)
    self._forward = forward_fn(config, mesh)
    if self._bank is None:
      return
    # The kNN bank and queries stay on the devices that computed them, as
    # [batches, B, ...] stacks (each batch's rows split over `data`): a
    # device holds N / devices rows, and only the hit counts are read back.
    self._stacks = {name: (len(batches), batches.batch_size, dim)
                    for name, batches in (("bank", self._bank),
                                          ("queries", self._queries))}
    self._empty, self._store = stack_fns(mesh)
    self._knn_counts = knn.sharded_knn(
        mesh, self._num_classes,
        int(min(self._knn["k"], self._bank.num_examples)),
        float(self._knn["temperature"]), counts=True)

  def __call__(self, encoder_vars: Any, classifier_params: Any = None,
               prefix: str = "eval/") -> dict[str, float]:
    """Runs the evaluations.

    Args:
      encoder_vars: {'params', 'batch_stats'} of the encoder (replicated).
      classifier_params: the online classifier's Dense params, or None.
      prefix: prepended to the result names.

    Returns:
      {prefix + 'online_top1', 'online_top5' (with a classifier),
      'knn_top1', 'knn_top5' (kNN enabled)}: fractions in [0, 1].
    """
    if not self.enabled:
      return {}
    results = {}
    want_features = self._bank is not None
    scored = classifier_params is not None
    if not scored:
      classifier_params = self._no_classifier
    totals, previous = None, None
    stacks = ({name: self._empty(*shape) for name, shape in
               self._stacks.items()} if want_features else {})
    passes = [("queries", self._queries)]
    if want_features:
      passes.append(("bank", self._bank))
    what = prefix.rstrip("/_")
    for name, batches in passes:
      label = (f"{what} on {batches.num_examples} images" if name == "queries"
               else f"{what}: kNN bank of {batches.num_examples} images")
      for i, batch in enumerate(progress.track(batches, label)):
        feats, counts = self._forward(encoder_vars, classifier_params, batch)
        if self._throttle and previous is not None:
          jax.block_until_ready(previous)  # XLA:CPU: a shallow queue.
        previous = counts
        if scored and name == "queries":
          totals = counts if totals is None else jax.tree.map(
              jnp.add, totals, counts)
        if want_features:
          stacks[name] = self._store(stacks[name], feats, batch["label"],
                                     batch["mask"], i)
          previous = stacks[name][0]
    if totals is not None:
      t = {k: int(sharding.to_host(v)) for k, v in totals.items()}
      n = max(t["count"], 1)
      results[prefix + "online_top1"] = t["correct1"] / n
      if self._num_classes >= 5:
        results[prefix + "online_top5"] = t["correct5"] / n
    if want_features:
      (bank_f, bank_y, bank_m), (query_f, query_y, query_m) = (
          stacks["bank"], stacks["queries"])
      hits = self._knn_counts(bank_f, bank_y, bank_m, query_f, query_y,
                              query_m)
      t = {k: int(sharding.to_host(v)) for k, v in hits.items()}
      n = max(t["count"], 1)
      results[prefix + "knn_top1"] = t["correct1"] / n
      if self._num_classes >= 5:
        results[prefix + "knn_top5"] = t["correct5"] / n
    return results


def forward_fn(config: ml_collections.ConfigDict, mesh: Mesh):
  """Jitted `(encoder_vars, classifier_params, batch) -> (features, counts)`.

  The encoder in inference mode: L2-normalised features [B, D] (rows on
  `data`) and the classifier's `online.correct_counts` (replicated).
  """
  encoder = network.make_encoder(config)
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

  A stack is (features f32 [n, B, D], labels int32 [n, B], mask bool
  [n, B]) on `knn.rows_sharding`; `store` writes batch i in place (the
  stack is donated), so each device only ever holds its own rows.
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
