"""Multi-host start-up: joining JAX's multi-controller runtime."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from byol_jax import sharding


def _several_hosts_from_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(mode: str = "auto", coordinator_address=None,
               num_processes=None, process_id=None, **options) -> None:
  """Joins JAX's multi-controller runtime when running on several hosts.

  Args:
    mode: 'yes', 'no', or 'auto' (join when the environment names several
      hosts or any explicit argument is given).
    coordinator_address, num_processes, process_id: passed through; None
      lets JAX detect them.
    **options: more arguments of `jax.distributed.initialize`.
  """
  explicit = coordinator_address is not None or num_processes is not None
  if mode == "no" or (mode == "auto" and not explicit and
                      not _several_hosts_from_env()):
    return
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs, **options)
  logging.info("Process %d of %d; %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    _connect_cpu_collectives()


def _connect_cpu_collectives() -> None:
  """Connects the processes' CPU collectives (gloo) now, while in step."""
  mesh = sharding.make_mesh()
  ones = jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh),
      np.ones((jax.local_device_count(),), np.int32))
  total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"CPU collectives: {int(total)} devices answered, not "
                       f"{jax.device_count()}.")
