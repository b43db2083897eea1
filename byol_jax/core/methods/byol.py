"""BYOL (Grill et al., 2020): predict the other view's EMA-target projection.

Each view goes through the networks on its own, so batch-norm statistics are
per view over the global batch. The target runs in training mode too: it
normalises with batch statistics and keeps its own moving averages.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from byol_jax.core.methods import network

HAS_TARGET = True


def make_network(config: ml_collections.ConfigDict) -> network.Network:
  """Online network: ResNet, MLP projector and MLP predictor (4096 -> 256).

  As the official code builds them: the heads' output layers have no bias,
  and the online classifier starts from Haiku's default initialisation.
  """
  return network.Network(
      encoder=network.make_encoder(config),
      projector=network.make_head(config, "projector"),
      predictor=network.make_head(config, "predictor"),
      num_classes=config.data.num_classes,
      classifier_init=network.HAIKU_LINEAR_INIT)


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z) per row [B] of p, z [B, P]."""
  p, z = network.l2_normalize(p), network.l2_normalize(z)
  return 2.0 - 2.0 * jnp.sum(p * z, axis=-1)


def symmetric_loss(p1, p2, z1, z2) -> jax.Array:
  """BYOL's loss: both directions SUMMED per example, averaged over the batch.

  Args:
    p1, p2: online predictions of views 1 and 2 [B, P].
    z1, z2: target projections of views 1 and 2 [B, P] (no gradient).
  """
  return jnp.mean(regression_loss(p1, jax.lax.stop_gradient(z2)) +
                  regression_loss(p2, jax.lax.stop_gradient(z1)))


def update_target(target_params, online_params, tau):
  """EMA xi <- tau xi + (1 - tau) theta; online-only subtrees are ignored."""
  online = {k: online_params[k] for k in target_params}
  return optax.incremental_update(online, target_params, step_size=1.0 - tau)


def loss_fn(config, model, params, batch_stats, target, view1, view2):
  """The BYOL loss of one batch of view pairs (every method's contract).

  Args:
    config: the run's config (BYOL reads nothing from it).
    model: the `network.Network`.
    params, batch_stats: the online network's variables.
    target: the target's {'params', 'batch_stats'} (encoder and projector).
    view1, view2: augmented, normalised views [B, H, W, 3].

  Returns:
    (loss, (online outputs of view 1, new online batch_stats,
    new target batch_stats, extra metrics)).
  """
  del config
  on1, on2, bs = network.apply_views(
      model, {"params": params, "batch_stats": batch_stats}, view1, view2)
  tg1, tg2, tbs = network.apply_views(model, target, view1, view2,
                                      method=model.project)
  loss = symmetric_loss(on1["pred"], on2["pred"], tg1["proj"], tg2["proj"])
  return loss, (on1, bs, tbs, {})
