"""One 32-bit checksum per leaf, computed on device: saved with each
checkpoint and verified after restore, so flipped bytes that decode are caught.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# One small program per leaf shape, dtype and sharding, not one over every
# leaf: that one's compile time grows with the number of leaves.
@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the array's bits as uint32 words, mod 2^32.

  Integer sums modulo 2^32 do not depend on the order of the reduction, so
  the value is the same on any device layout; a flipped bit changes it, and
  the position weights catch swapped words.
  """
  x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
  bits = min(jnp.dtype(x.dtype).itemsize * 8, 32)   # 64 bits: 2 words each.
  w = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
  w = w.reshape(-1).astype(jnp.uint32)
  pos = jnp.arange(w.shape[0], dtype=jnp.uint32)
  return jnp.sum(w * (pos * jnp.uint32(2654435761) + jnp.uint32(1)),
                 dtype=jnp.uint32)


def compute(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a pytree of arrays (computed on device)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  sums = jax.device_get([_leaf_checksum(v) for _, v in leaves])
  return {jax.tree_util.keystr(p): int(np.asarray(s))
          for (p, _), s in zip(leaves, sums)}
