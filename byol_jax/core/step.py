"""The train step of every method: (state, batch) -> (state, metrics).

`batch` is the global batch {'view1', 'view2': [B, S, S, 3] crops (uint8, or
float in [0, 1]), 'label': int32 [B] (-1 where unknown)}, sharded over the
`data` axis; the state is replicated and donated. `metrics`: float32 scalars,
the global norms of the gradient, update and new params and `finite` among
them. Randomness is `fold_in(seed_key, state.step)`: a resume is exact.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from byol_jax.core import methods
from byol_jax.core import sharding
from byol_jax.core.methods import byol
from byol_jax.core.methods import network
from byol_jax.core.train_state import TrainState
from byol_jax.data import augment


def classifier_metrics(logits: jax.Array, labels: jax.Array):
  """Cross-entropy and accuracy of logits [B, C] over labels [B] >= 0."""
  valid = labels >= 0
  count = jnp.maximum(jnp.sum(valid), 1)
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(valid, labels, 0))
  acc = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(jnp.where(valid, ce, 0.0)) / count, jnp.sum(acc) / count


def embedding_std(z: jax.Array) -> jax.Array:
  """Mean batch std of z/|z| [B, P]: 1/sqrt(P) when spread, 0 if collapsed."""
  return jnp.mean(jnp.std(network.l2_normalize(z), axis=0))


def all_finite(tree) -> jax.Array:
  """One bool: every leaf of `tree` is finite (integers always are)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def make_train_step(config: ml_collections.ConfigDict, model: network.Network,
                    tx: optax.GradientTransformation, lr_fn: optax.Schedule,
                    tau_fn: optax.Schedule | None):
  """The unjitted step; `tau_fn`: BYOL's EMA decay (None without a target)."""
  method = methods.get(config.method)
  seed_key = jax.random.PRNGKey(config.seed)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(seed_key, state.step)
    view1, view2 = augment.augment_views(rng, batch, config.augment)

    def total_loss(params):
      loss, (out1, bs, tbs, extra) = method.loss_fn(
          config, model, params, state.batch_stats, state.target, view1, view2)
      aux = dict(loss=loss, embedding_std=embedding_std(out1["proj"]),
                 **extra)
      if "logits" in out1:  # Labelled data: train the online classifier.
        # It reads a stop-gradient copy of the representation, so adding its
        # loss trains it without moving the encoder.
        aux["classifier_loss"], aux["classifier_accuracy"] = (
            classifier_metrics(out1["logits"], batch["label"]))
        loss = loss + aux["classifier_loss"]
      return loss, (aux, bs, tbs)

    grads, (metrics, bs, tbs) = jax.grad(total_loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target = state.target
    metrics["lr"] = lr_fn(state.step)
    if method.HAS_TARGET:
      metrics["tau"] = tau_fn(state.step)
      target = dict(batch_stats=tbs, params=byol.update_target(
          target["params"], params, metrics["tau"]))
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=bs, target=target,
                              opt_state=opt_state)
    # Read only on log and save steps: a state with a NaN or Inf is never
    # saved; param_norm tells whether a finite one diverges (divergence.py).
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
