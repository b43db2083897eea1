"""The network every method trains: encoder, projector, predictor, classifier.

Parameters live under the top-level keys `encoder`, `projector`, `predictor`
(BYOL and SimSiam) and `classifier` (online, linear), so the encoder can be cut
out of a checkpoint by key and the optimizer treat the other heads apart.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from byol_jax.core import models
from byol_jax.errors import ConfigError

# Haiku's default Linear initialiser (the official BYOL classifier's): a normal
# of std 1/sqrt(fan_in) truncated at 2 std. The scale cancels the division by
# 0.8796 (the truncated normal's std) in JAX's "truncated_normal".
HAIKU_LINEAR_INIT = nn.initializers.variance_scaling(
    0.87962566103423978 ** 2, "fan_in", "truncated_normal")


class Network(nn.Module):
  """Encoder f, projector g, optional predictor q and a linear classifier.

  Attributes:
    encoder: maps images [B, H, W, 3] to representations y [B, D].
    projector: maps y to projections z [B, P].
    predictor: maps z to predictions q [B, P]; None for SimCLR.
    num_classes: classes of the online classifier (0: none).
    classifier_init: the classifier kernel's initialiser (bias: zeros).
  """
  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module | None
  num_classes: int
  classifier_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    """Runs every part; returns repr [B, D], proj [B, P], pred and logits."""
    out = self.project(x, train)
    out["pred"] = (out["proj"] if self.predictor is None
                   else self.predictor(out["proj"], train=train))
    if self.num_classes < 0:
      raise ConfigError(
          f"config.data.num_classes={self.num_classes} means 'from the data':"
          " build the network from byol_jax.data.resolve(config).")
    if self.num_classes:
      # The classifier sees a stop-gradient copy: it never moves the encoder.
      y = jax.lax.stop_gradient(out["repr"])
      out["logits"] = nn.Dense(self.num_classes, name="classifier",
                               kernel_init=self.classifier_init)(y)
    return out

  def project(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    """Encoder and projector only: the target network's forward pass."""
    y = self.encoder(x, train=train)
    return dict(repr=y, proj=self.projector(y, train=train))

  def represent(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The representation y used downstream [B, D]."""
    return self.encoder(x, train=train)


def apply_views(model: Network, variables: dict, view1, view2, method=None):
  """(out1, out2, new batch_stats): training mode, each view on its own."""
  out1, bs = model.apply(variables, view1, train=True, method=method,
                         mutable=["batch_stats"])
  out2, bs = model.apply({"params": variables["params"], **bs}, view2,
                         train=True, method=method, mutable=["batch_stats"])
  return out1, out2, bs["batch_stats"]


def make_encoder(config: ml_collections.ConfigDict) -> nn.Module:
  """The ResNet encoder described by `config.model`."""
  m = config.model
  if m.padding not in models.PADDINGS:
    raise ConfigError(f"model.padding={m.padding!r}; use one of "
                      f"{list(models.PADDINGS)}.")
  return models.resnet(
      m.depth, width=m.width, stem=m.stem, num_filters=m.num_filters,
      padding=m.padding, dtype=jnp.dtype(m.dtype),
      zero_init_residual=m.zero_init_residual, bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon)


def make_head(config: ml_collections.ConfigDict, name: str,
              **kwargs) -> models.MLP:
  """The MLP sized by `config[name]`; kwargs: its other `models.MLP` fields."""
  return models.MLP(
      config[name].hidden_dim, config[name].output_dim,
      num_layers=config[name].num_layers, dtype=jnp.dtype(config.model.dtype),
      bn_momentum=config.model.bn_momentum,
      bn_epsilon=config.model.bn_epsilon, **kwargs)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / |x| along the last axis, in float32, with a finite gradient at 0."""
  # Not x / max(|x|, eps): the norm's gradient is 0/0 for an all-zero row (a
  # ReLU layer can output one), and one NaN gradient poisons the network.
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
