"""Multi-host start-up: join `jax.distributed` when the cluster says so.

`jax.distributed.initialize()` without arguments asks JAX's cluster
environments (Open MPI, SLURM, GKE TPU, Cloud TPU VM through the GCE metadata
server, Kubernetes) for the coordinator, the number of processes and this
process's index. `--multihost=auto` asks the same environments, in the same
order, and joins only when the one JAX would use says more than one process:
a single-host TPU VM (v3-8, v5e-8 ...) or a SLURM job of one task runs alone,
as does a plain machine, where JAX finds nothing and would raise.

Detection reads `jax._src.clusters`, JAX's own (private) registry, so that it
follows JAX's rules exactly; tests/test_multihost_detect.py pins the
behaviour for each environment.
"""
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax._src import clusters as jax_clusters

from byol_jax.core import sharding
from byol_jax.errors import ConfigError

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself
# When a process dies, the others stop about this long after (JAX: 100 s).
HEARTBEAT_TIMEOUT_SECONDS = 15
# How long a finished process waits for the others at exit (JAX: 300 s).
SHUTDOWN_TIMEOUT_SECONDS = 60


def _cluster_env():
  """The cluster environment `jax.distributed.initialize()` would use.

  Same rule as `ClusterEnv.auto_detect_unset_distributed_params`: the first
  registered environment that is not opt-in only (mpi4py) and is present.
  Returns the ClusterEnv subclass, or None.
  """
  # pylint: disable-next=protected-access
  for env in jax_clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      return env
  return None


def detect() -> Optional[str]:
  """Names the multi-process environment this process runs in.

  Returns:
    'JAX_COORDINATOR_ADDRESS' when that variable is set; else the class name
    of the JAX cluster environment found ('OmpiCluster', 'SlurmCluster',
    'GkeTpuCluster', 'GceTpuCluster', 'K8sCluster'), whatever its number of
    processes; None on a plain machine.
  """
  if os.environ.get(COORDINATOR_ENV):
    return COORDINATOR_ENV
  env = _cluster_env()
  return None if env is None else env.__name__


def check_flags(mode: str = "auto", coordinator_address: Optional[str] = None,
                num_processes: Optional[int] = None,
                process_id: Optional[int] = None) -> None:
  """Checks the multi-host flags together, before anything starts.

  Raises:
    ConfigError: one line for a combination that cannot work: an unknown
      mode, a count below 1, an id outside 0..count-1, several processes
      asked for with --multihost=no, or several processes given without
      a coordinator that anything names.
  """
  if mode not in ("auto", "yes", "no"):
    raise ConfigError(f"--multihost={mode}: use auto, yes or no.")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: give the number of "
                      "processes in the job, 1 or more.")
  if process_id is not None and process_id < 0:
    raise ConfigError(f"--process_id={process_id}: give this process's "
                      "index, 0 for the first.")
  if (num_processes is not None and process_id is not None and
      process_id >= num_processes):
    raise ConfigError(
        f"--process_id={process_id} with --num_processes={num_processes}: "
        f"the ids run from 0 to {num_processes - 1}; give each process its "
        "own id in that range.")
  several = ((num_processes or 1) > 1 or (process_id or 0) > 0 or
             coordinator_address is not None)
  if mode == "no" and several:
    given = " ".join(f"--{k}={v}" for k, v in (
        ("coordinator_address", coordinator_address),
        ("num_processes", num_processes), ("process_id", process_id))
                     if v is not None)
    raise ConfigError(
        f"--multihost=no runs one process, but {given} describe a job of "
        "several: drop them to run alone, or use --multihost=auto (or yes) "
        "to join the job.")
  if (mode != "no" and (num_processes or 1) > 1 and
      coordinator_address is None and not os.environ.get(COORDINATOR_ENV)
      and _cluster_env() is None):
    raise ConfigError(
        f"--num_processes={num_processes} but nothing names the coordinator: "
        "give --coordinator_address=HOST:PORT (process 0's address) to every "
        "process, or set JAX_COORDINATOR_ADDRESS.")


def should_join(mode: str = "auto", coordinator_address: Optional[str] = None,
                num_processes: Optional[int] = None,
                process_id: Optional[int] = None) -> bool:
  """Whether `initialize` joins `jax.distributed` (decides, joins nothing).

  Args:
    mode: 'yes', 'no', or 'auto': join when an explicit coordinator address,
      process count or process id is given, when JAX_COORDINATOR_ADDRESS is
      set, or when the cluster environment JAX finds says more than one
      process.
    coordinator_address, num_processes, process_id: as given on the command
      line.
  """
  if mode not in ("auto", "yes", "no"):
    raise ConfigError(f"--multihost={mode}: use auto, yes or no.")
  if mode != "auto":
    return mode == "yes"
  if (coordinator_address is not None or num_processes is not None or
      process_id is not None):
    return True
  if os.environ.get(COORDINATOR_ENV):
    return True
  env = _cluster_env()
  return env is not None and env.get_process_count() > 1


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, **options) -> bool:
  """Joins JAX's multi-controller runtime when running on several hosts.

  Call it before anything touches the devices.

  Args:
    mode: 'yes', 'no' or 'auto' (see `should_join`).
    coordinator_address, num_processes, process_id: passed through; None
      lets JAX detect them (Cloud TPU, SLURM, Open MPI, Kubernetes).
    **options: more arguments of `jax.distributed.initialize`, e.g.
      initialization_timeout, heartbeat_timeout_seconds (how soon the others
      stop when a process dies), shutdown_timeout_seconds,
      cluster_detection_method='mpi4py'.

  Returns:
    Whether it joined.

  Raises:
    ConfigError: flags that do not fit together (`check_flags`), or it
      should join but nothing says how many processes there are.
  """
  check_flags(mode, coordinator_address, num_processes, process_id)
  if not should_join(mode, coordinator_address, num_processes, process_id):
    return False
  if (num_processes is None and not options.get("cluster_detection_method")
      and _cluster_env() is None):
    raise ConfigError(
        f"--multihost={mode} but no cluster environment (SLURM, Open MPI, "
        "Cloud TPU, Kubernetes) says how many processes run: give "
        "--coordinator_address=HOST:PORT, --num_processes and --process_id "
        "on every process, or --multihost=no.")
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs, **options)
  logging.info("Process %d of %d (%s); %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               detect() or "explicit arguments", jax.local_device_count(),
               jax.device_count())
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    _connect_cpu_collectives()
  return True


def _connect_cpu_collectives() -> None:
  """Connects the processes' CPU collectives (gloo) now, while in step.

  Gloo connects the processes at their first collective over all devices
  and gives up if one arrives more than 30 s after another: on a loaded
  machine one process can finish compiling the train step that much later.
  Once connected, collectives wait for the slowest process.
  """
  mesh = sharding.make_mesh()
  ones = jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh),
      np.ones((jax.local_device_count(),), np.int32))
  total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"CPU collectives: {int(total)} devices answered, not "
                       f"{jax.device_count()}.")
