"""The train state: one pytree, replicated over the mesh and donated."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from byol_jax.core import sharding
from byol_jax.core.methods import network


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly (randomness derives from step).

  `params`, `batch_stats`: the online network's ({'encoder', 'projector',
  ['predictor'], 'classifier'}); `target`: BYOL's {'params', 'batch_stats'}
  (encoder and projector) or None; `step`: int32 optimizer steps taken.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  target: Any
  opt_state: optax.OptState


def create(config: ml_collections.ConfigDict, model: network.Network,
           tx: optax.GradientTransformation, mesh: Mesh,
           has_target: bool) -> TrainState:
  """Initialises the state from config.seed, replicated over `mesh`.

  The target network gets its own key (the paper reports no difference from
  copying the online network) and only the encoder and projector.
  """
  rep = sharding.replicated(mesh)

  # One program initialises either network (which = 0: online, 1: target):
  # BYOL's two networks then cost one compilation, not one each.
  def init_network(key, which):
    size = config.data.image_size
    dummy = jnp.zeros((2, size, size, 3), jnp.float32)
    return model.init(jax.random.split(key)[which], dummy, train=True)

  # 'rbg' compiles a ResNet's init far faster than threefry (on CPU: seconds).
  key = jax.random.key(config.seed, impl="rbg")
  init_network = jax.jit(init_network, out_shardings=rep)
  variables, target = init_network(key, 0), None
  if has_target:
    target = {col: {k: v for k, v in tree.items()
                    if k in ("encoder", "projector")}
              for col, tree in init_network(key, 1).items()}
  step, opt_state = jax.jit(lambda p: (jnp.zeros((), jnp.int32), tx.init(p)),
                            out_shardings=rep)(variables["params"])
  return TrainState(step=step, params=variables["params"],
                    batch_stats=variables["batch_stats"], target=target,
                    opt_state=opt_state)


def abstract(config, model, tx, mesh, has_target) -> TrainState:
  """Shapes, dtypes and shardings of the state, without allocating it."""
  shapes = jax.eval_shape(lambda: create(config, model, tx, mesh, has_target))
  rep = sharding.replicated(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
