"""SimSiam (Chen & He, 2021): BYOL without the target network.

One network; the other view's projection is only stop-gradient.
"""
import jax
import jax.numpy as jnp
import ml_collections

from byol_jax.core.methods import network

HAS_TARGET = False


def make_network(config: ml_collections.ConfigDict) -> network.Network:
  """ResNet, projector (last BN without affine), 2048-512-2048 predictor."""
  return network.Network(
      encoder=network.make_encoder(config),
      projector=network.make_head(
          config, "projector", hidden_bias=False, output_bn=True,
          output_bn_scale=False, output_bn_bias=False),
      # The reference's last predictor Linear keeps its bias.
      predictor=network.make_head(config, "predictor", hidden_bias=False,
                                  output_bias=True),
      num_classes=config.data.num_classes)


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  """-cos(p, sg(z)) per row [B]; the gradient never reaches z."""
  p = network.l2_normalize(p)
  z = network.l2_normalize(jax.lax.stop_gradient(z))
  return -jnp.sum(p * z, axis=-1)


def symmetric_loss(p1, p2, z1, z2) -> jax.Array:
  """-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2, averaged over the batch."""
  return jnp.mean(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2.0


def loss_fn(config, model, params, batch_stats, target, view1, view2):
  """The SimSiam loss; contract of `byol.loss_fn` (config, target unused)."""
  del config, target
  out1, out2, bs = network.apply_views(
      model, {"params": params, "batch_stats": batch_stats}, view1, view2)
  loss = symmetric_loss(out1["pred"], out2["pred"], out1["proj"], out2["proj"])
  return loss, (out1, bs, None, {})
