"""MLP heads: the projectors and predictors of BYOL, SimSiam and SimCLR."""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from byol_jax.core.models.resnet import batch_norm


class MLP(nn.Module):
  """(num_layers - 1) x [Dense -> BN -> ReLU], Dense, optional BN.

  Attributes:
    hidden_dim, output_dim: widths of the hidden layers and of the output.
    num_layers: number of Dense layers (>= 1).
    hidden_bias, output_bias: biases of the hidden Dense layers (redundant
      before BN, but BYOL keeps them) and of the last one (BYOL: none).
    output_bn, output_bn_scale, output_bn_bias: batch-normalise the output,
      with a learnt scale and offset.
    dtype: computation dtype; parameters and the output stay float32.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int = 2
  hidden_bias: bool = True
  output_bias: bool = False
  output_bn: bool = False
  output_bn_scale: bool = True
  output_bn_bias: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps [B, D_in] (any float dtype) to [B, output_dim] float32."""
    if self.num_layers < 1:
      raise ValueError(f"MLP needs num_layers >= 1, got {self.num_layers}.")
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=jnp.float32)
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    x = jnp.asarray(x).astype(self.dtype)
    for i in range(1, self.num_layers):
      x = dense(self.hidden_dim, use_bias=self.hidden_bias,
                name=f"dense{i}")(x)                      # [B, hidden_dim]
      x = nn.relu(norm(name=f"bn{i}")(x))
    x = dense(self.output_dim, use_bias=self.output_bias,
              name=f"dense{self.num_layers}")(x)          # [B, output_dim]
    if self.output_bn:
      x = norm(use_scale=self.output_bn_scale, use_bias=self.output_bn_bias,
               name=f"bn{self.num_layers}")(x)
    return x.astype(jnp.float32)
