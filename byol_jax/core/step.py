"""The train step shared by every method: a pure function under `jax.jit`.

    train_step(state, batch) -> (state, metrics)

`metrics` holds the scalars to log (with the global L2 norms of the
gradient, the optimizer's update and the new parameters) and `finite` (1.0
when every leaf of the new state is finite).
`batch` is the global batch {'view1', 'view2': [B, S, S, 3] crops (uint8, or
float in [0, 1]), 'label': int32 [B] (-1 where unknown)}, sharded over the
`data` axis; the state is replicated and donated. Randomness is
`fold_in(seed_key, state.step)`, so a resumed run continues exactly.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from byol_jax.core import methods
from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.core.methods import byol
from byol_jax.core.methods import network
from byol_jax.core.train_state import TrainState


def classifier_metrics(logits: jax.Array, labels: jax.Array):
  """Cross-entropy and accuracy of logits [B, C] over labels [B] >= 0."""
  valid = labels >= 0
  count = jnp.maximum(jnp.sum(valid), 1)
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(valid, labels, 0))
  acc = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(jnp.where(valid, ce, 0.0)) / count, jnp.sum(acc) / count


def embedding_std(z: jax.Array) -> jax.Array:
  """Collapse indicator: mean over dimensions of the batch std of z/|z|.

  About 1/sqrt(P) for projections spread over the sphere, 0 when collapsed.
  """
  return jnp.mean(jnp.std(network.l2_normalize(z), axis=0))


def all_finite(tree) -> jax.Array:
  """One bool: every floating-point leaf of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def make_train_step(config: ml_collections.ConfigDict, model: network.Network,
                    tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule,
                    tau_fn: Callable[[jax.Array], jax.Array] | None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds the (unjitted) train step of `config.method`.

  `lr_fn` is logged; `tau_fn` is BYOL's EMA decay (None without a target).
  """
  method = methods.get(config.method)
  loss_fn = method.make_loss_fn(config)
  seed_key = jax.random.PRNGKey(config.seed)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(seed_key, state.step)
    view1, view2 = augment.augment_views(rng, batch, config.augment)

    def total_loss(params):
      loss, (out1, bs, tbs, extra) = loss_fn(
          model, params, state.batch_stats, state.target, view1, view2)
      aux = dict(loss=loss, embedding_std=embedding_std(out1["proj"]),
                 **extra)
      if "logits" not in out1:  # Unlabelled data: no online classifier.
        return loss, (aux, bs, tbs)
      cls_loss, cls_acc = classifier_metrics(out1["logits"],
                                             batch["label"])
      aux.update(classifier_loss=cls_loss, classifier_accuracy=cls_acc)
      # The classifier reads a stop-gradient copy of the representation, so
      # adding its loss trains it without moving the encoder.
      return loss + cls_loss, (aux, bs, tbs)

    grads, (metrics, bs, tbs) = jax.grad(total_loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target = state.target
    metrics["lr"] = lr_fn(state.step)
    if method.HAS_TARGET:
      tau = tau_fn(state.step)
      target = dict(params=byol.update_target(target["params"], params, tau),
                    batch_stats=tbs)
      metrics["tau"] = tau
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=bs, target=target,
                              opt_state=opt_state)
    # Read only where the loop syncs anyway (log and save steps): a state
    # with a NaN or Inf anywhere is never saved; param_norm also tells
    # whether a finite one is diverging (trainer/divergence.py).
    metrics.update(finite=all_finite(new_state),
                   grad_norm=optax.tree.norm(grads),
                   update_norm=optax.tree.norm(updates),
                   param_norm=optax.tree.norm(params))
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                   metrics)

  return train_step


def jit_train_step(train_step, mesh: Mesh):
  """Compiles the step: batch sharded on `data`, state replicated, donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(rep, sharding.batch_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=(0,))
