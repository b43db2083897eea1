"""The in-run baseline of step_throughput.py: a supervised step of an encoder.

One view, the config's encoder and a linear classifier, softmax
cross-entropy, SGD with momentum: forward + backward, about 3 encoder
forwards per image, against BYOL's 8.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from byol_jax.core import sharding
from byol_jax.core.methods import network


def _init_fn(config, tx):
  s = config.data.image_size
  encoder = network.make_encoder(config)
  classifier = nn.Dense(config.data.num_classes)

  def init():
    key_e, key_c = jax.random.split(jax.random.key(0, impl="rbg"))
    v = encoder.init(key_e, jnp.zeros((2, s, s, 3)), train=True)
    y = jax.eval_shape(lambda: encoder.apply(v, jnp.zeros((2, s, s, 3)),
                                             train=False))
    c = classifier.init(key_c, jnp.zeros(y.shape, jnp.float32))
    params = dict(encoder=v["params"], classifier=c["params"])
    return dict(params=params, batch_stats=v["batch_stats"],
                opt_state=tx.init(params))
  return encoder, classifier, init


def make_step(config, mesh):
  """(jitted step, init) of a supervised step of the config's encoder."""
  tx = optax.sgd(0.1, momentum=0.9)
  encoder, classifier, init = _init_fn(config, tx)

  def loss_fn(params, batch_stats, x, y):
    feats, new = encoder.apply({"params": params["encoder"],
                                "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
    logits = classifier.apply({"params": params["classifier"]},
                              feats.astype(jnp.float32))
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, y).mean()
    return loss, new["batch_stats"]

  def step(state, batch):
    x = batch["view1"].astype(jnp.float32) / 255.0  # [B, S, S, 3]
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], x, batch["label"])
    updates, opt_state = tx.update(g, state["opt_state"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates),
                batch_stats=bs, opt_state=opt_state), loss

  rep = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(rep, sharding.batch_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=(0,))
  return jitted, jax.jit(init, out_shardings=rep)
