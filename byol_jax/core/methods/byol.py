"""BYOL (Grill et al., 2020): predict an EMA target's projection of the other view.

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
  """EMA xi <- tau xi + (1 - tau) theta over every target leaf.

  Online subtrees the target lacks (predictor, classifier) are ignored.
  """
  online = {k: online_params[k] for k in target_params}
  return optax.incremental_update(online, target_params, step_size=1.0 - tau)


def make_loss_fn(config: ml_collections.ConfigDict):
  """BYOL's loss_fn (it has no hyper-parameters)."""
  del config
  return loss_fn


def loss_fn(model, params, batch_stats, target, view1, view2):
  """The BYOL loss of one batch of view pairs.

  Args:
    model: the `network.Network`.
    params, batch_stats: the online network's variables.
    target: the target's {'params', 'batch_stats'} (encoder and projector).
    view1, view2: augmented, normalised views [B, H, W, 3].

  Returns:
    (loss, (online outputs of view 1, new online batch_stats,
    new target batch_stats, extra metrics)).
  """
  on1, bs = model.apply({"params": params, "batch_stats": batch_stats}, view1,
                        train=True, mutable=["batch_stats"])
  on2, bs = model.apply({"params": params, **bs}, view2, train=True,
                        mutable=["batch_stats"])
  tg1, tbs = model.apply(target, view1, train=True, method=model.project,
                         mutable=["batch_stats"])
  tg2, tbs = model.apply({"params": target["params"], **tbs}, view2,
                         train=True, method=model.project,
                         mutable=["batch_stats"])
  loss = symmetric_loss(on1["pred"], on2["pred"], tg1["proj"], tg2["proj"])
  return loss, (on1, bs["batch_stats"], tbs["batch_stats"], {})
