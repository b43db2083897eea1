"""Checksums of a train state: one 32-bit word per leaf, computed on device.

Written beside each checkpoint at save time and verified after restore
(`checkpoint.py`), so that flipped bytes that still decode are caught.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
  """The bits of an array as uint32 words [n] (any dtype of 8 to 64 bits)."""
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  as_uint = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, as_uint).reshape(-1).astype(
      jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the words, modulo 2^32.

  Integer sums modulo 2^32 do not depend on the order of the reduction, so
  the value is the same on any device layout; a flipped bit changes it, and
  the position weights catch swapped words.
  """
  w = _words(x)
  pos = jnp.arange(w.shape[0], dtype=jnp.uint32)
  return jnp.sum(w * (pos * jnp.uint32(2654435761) + jnp.uint32(1)),
                 dtype=jnp.uint32)


# One small program per leaf shape, dtype and sharding (a ResNet-50 state has
# a few dozen), not one program over every leaf: compiling that one grows
# with the number of leaves (seconds for ResNet-50) and is paid again by
# every process that saves or restores.
_leaf_checksum_fn = jax.jit(_leaf_checksum)


def compute(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a pytree of arrays (computed on device)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  sums = jax.device_get([_leaf_checksum_fn(v) for _, v in leaves])
  return {jax.tree_util.keystr(p): int(np.asarray(s))
          for (p, _), s in zip(leaves, sums)}
