"""SimCLR (Chen et al., 2020): NT-Xent over the global batch.

Under `jax.jit` on globally sharded arrays the similarity matrix spans every
device, so each view's negatives are the other 2(N - 1) views of the whole
global batch, not of one device's shard.
"""
import jax
import jax.numpy as jnp
import ml_collections

from byol_jax.core.methods import network

HAS_TARGET = False


def make_network(config: ml_collections.ConfigDict) -> network.Network:
  """ResNet, SimCLR v2's head (output BN without offset), no predictor."""
  return network.Network(
      encoder=network.make_encoder(config),
      projector=network.make_head(config, "projector", hidden_bias=False,
                                  output_bn=True, output_bn_bias=False),
      predictor=None,
      num_classes=config.data.num_classes)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """NT-Xent of pairs (z1[i], z2[i]) [N, P], averaged over the 2N views.

  Mean over views i of -log(exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)).
  """
  n = z1.shape[0]
  # Interleaved [2N, P] (row 2i + v: view v + 1 of example i), as in loss_fn.
  z = network.l2_normalize(jnp.stack([z1, z2], axis=1).reshape(2 * n, -1))
  logits = z @ z.T / temperature                                 # [2N, 2N]
  # Mask self-similarity out of the softmax with a large negative number.
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, logits)
  positives = jnp.arange(2 * n) ^ 1                              # 2i <-> 2i+1
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_prob, positives[:, None], axis=-1))


def loss_fn(config, model, params, batch_stats, target, view1, view2):
  """NT-Xent at `config.temperature`; contract of `byol.loss_fn`."""
  del target
  n = view1.shape[0]
  # Both views in ONE batch-norm batch, as in SimCLR, interleaved per
  # example ([2N, H, W, 3], row 2i + v = view v + 1 of example i): unlike a
  # concatenation, stacking keeps each example's views on its device.
  both = jnp.stack([view1, view2], axis=1).reshape(2 * n, *view1.shape[1:])
  out, bs = model.apply({"params": params, "batch_stats": batch_stats},
                        both, train=True, mutable=["batch_stats"])
  pairs = jax.tree.map(lambda x: x.reshape(n, 2, *x.shape[1:]), out)
  loss = nt_xent(pairs["proj"][:, 0], pairs["proj"][:, 1], config.temperature)
  out1 = jax.tree.map(lambda x: x[:, 0], pairs)
  return loss, (out1, bs["batch_stats"], None, {})
