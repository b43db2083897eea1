"""The device mesh and the two shardings the trainer uses.

One `data` axis over every device of every process: the batch is split along
it, the train state is replicated on it.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from byol_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all global devices).

  `jax.make_mesh` orders them for fast all-reduces (a ring on TPU); the axis
  is `Auto`, so XLA propagates the shardings given to `jax.jit`.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The per-process share of the global batch, or a ConfigError."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    problem = (": a batch needs at least one image" if global_batch_size <= 0
               else f" is not divisible by the {n} devices")
    raise ConfigError(f"batch_size={global_batch_size}{problem}; set "
                      f"--config.batch_size to a positive multiple of {n}.")
  return global_batch_size // jax.process_count()


def fit_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the devices (evaluations)."""
  n = mesh.devices.size
  return max(n, -(-int(batch_size) // n) * n)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Global arrays sharded on `data` from this process's NumPy batch slice."""
  # A deliberate host-to-device copy: allowed under the trainer's guard
  # against implicit transfers.
  with jax.transfer_guard("allow"):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        batch_sharding(mesh), np.asarray(x)), local)


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array, as NumPy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
