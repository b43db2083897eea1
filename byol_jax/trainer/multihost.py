"""Multi-host start-up: join `jax.distributed` when the cluster says so.

`--multihost=auto` joins only when JAX's cluster environment (Open MPI,
SLURM, GKE TPU, Cloud TPU VM, Kubernetes) says more than one process. JAX
has no public API for that count without joining (only the private
`jax._src.clusters`), so `_cluster` reads what JAX 0.7 to 0.10 read, in
JAX's order; tests/test_multihost_detect.py pins it per environment.
"""
import importlib.util
import os
import pathlib
import urllib.request
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from byol_jax.core import sharding
from byol_jax.errors import ConfigError

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself
HEARTBEAT_TIMEOUT_SECONDS = 15  # A lost process stops the others (JAX: 100).
SHUTDOWN_TIMEOUT_SECONDS = 60  # Waiting for the others at exit (JAX: 300).
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
          "SLURM_PROCID", "SLURM_LOCALID")
# JAX's TPU chips on the PCI bus: Google's vendor id, v3 ... TPU7x device ids.
_TPU_PCI = ("0x1ae0", ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063",
                       "0x006f", "0x0076"))


def _metadata(key: str) -> Optional[str]:
  """A Cloud TPU VM's attribute from the GCE metadata server, as JAX asks."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=10) as answer:
      return answer.read().decode()
  except OSError:  # Not found (HTTPError), or no server.
    return None


def _on_cloud_tpu_vm() -> bool:
  """JAX's test (cloud_tpu_init): libtpu and a TPU chip on the PCI bus."""
  if "JAX_FORCE_TPU_INIT" in os.environ:
    return True
  if importlib.util.find_spec("libtpu") is None:
    return False
  return any(v.read_text().strip() == _TPU_PCI[0] and
             (v.parent / "device").read_text().strip() in _TPU_PCI[1]
             for v in pathlib.Path("/sys/bus/pci/devices").glob("*/vendor"))


def _num_slices() -> int:
  """Multislice TPU jobs: slices, from the environment or the metadata."""
  value = os.environ.get("MEGASCALE_NUM_SLICES")
  for line in ("" if value else _metadata("tpu-env") or "").splitlines():
    key, _, v = line.partition(":")
    if key.strip() == "MEGASCALE_NUM_SLICES":
      value = v.strip().strip("'")
  return int(value or 1)


def _cluster() -> Optional[tuple[str, Optional[int]]]:
  """(name, process count or None) of the environment JAX would use."""
  env = os.environ
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "OmpiCluster", int(env["OMPI_COMM_WORLD_SIZE"])
  if all(k in env for k in _SLURM):
    return "SlurmCluster", int(env["SLURM_NTASKS"])
  tpu_vm = _on_cloud_tpu_vm()
  workers = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
  if tpu_vm and workers is not None:
    return "GkeTpuCluster", len(workers.split(",")) * _num_slices()
  if (tpu_vm and "TPU_SKIP_MDS_QUERY" not in env and
      _metadata("agent-worker-number") is not None):
    endpoints = (_metadata("worker-network-endpoints") or "").split(",")
    return "GceTpuCluster", len(endpoints) * _num_slices()
  if ("KUBERNETES_SERVICE_HOST" in env and
      importlib.util.find_spec("kubernetes") is not None):
    return "K8sCluster", None
  return None


def detect() -> Optional[str]:
  """'JAX_COORDINATOR_ADDRESS' if set, else the cluster environment's name
  ('SlurmCluster' ...); None on a plain machine."""
  if os.environ.get(COORDINATOR_ENV):
    return COORDINATOR_ENV
  cluster = _cluster()
  return cluster and cluster[0]


def _check_flags(mode: str, given: dict[str, Any]) -> None:
  """Raises ConfigError (one line) for multi-host flags that cannot work."""
  n, i = given.get("num_processes"), given.get("process_id")
  if n is not None and n < 1:
    raise ConfigError(f"--num_processes={n}: give the number of processes "
                      "in the job, 1 or more.")
  if i is not None and i < 0:
    raise ConfigError(f"--process_id={i}: give this process's index, 0 for "
                      "the first.")
  if n is not None and i is not None and i >= n:
    raise ConfigError(
        f"--process_id={i} with --num_processes={n}: the ids run from 0 to "
        f"{n - 1}; give each process its own id in that range.")
  if mode == "no" and ((n or 1) > 1 or (i or 0) > 0 or
                       "coordinator_address" in given):
    raise ConfigError(
        "--multihost=no runs one process, but " + " ".join(
            f"--{k}={v}" for k, v in given.items()) +
        " describe a job of several: drop them to run alone, or use "
        "--multihost=auto (or yes) to join the job.")
  if (mode != "no" and (n or 1) > 1 and "coordinator_address" not in given
      and detect() is None):
    raise ConfigError(
        f"--num_processes={n} but nothing names the coordinator: give "
        "--coordinator_address=HOST:PORT (process 0's address) to every "
        "process, or set JAX_COORDINATOR_ADDRESS.")


def should_join(mode: str = "auto", **given) -> bool:
  """Whether `initialize` joins: for 'auto', when a flag (coordinator_address,
  num_processes, process_id) or JAX_COORDINATOR_ADDRESS is given or the
  cluster has several processes."""
  if mode != "auto":
    return mode == "yes"
  if (any(v is not None for v in given.values()) or
      os.environ.get(COORDINATOR_ENV)):
    return True
  cluster = _cluster()
  return cluster is not None and (cluster[1] or 2) > 1


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               before_join: Optional[Callable[[], None]] = None,
               **options) -> bool:
  """Joins `jax.distributed` if `should_join`; returns whether it joined.

  None arguments are detected by JAX; `options` go to its `initialize`.
  Raises ConfigError for flags that do not fit or an unknown process count.
  """
  given = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                 num_processes=num_processes,
                                 process_id=process_id).items()
           if v is not None}
  _check_flags(mode, given)
  if not should_join(mode, **given):
    return False
  if (num_processes is None and not options.get("cluster_detection_method")
      and _cluster() is None):
    raise ConfigError(
        f"--multihost={mode} but no cluster environment (SLURM, Open MPI, "
        "Cloud TPU, Kubernetes) says how many processes run: give "
        "--coordinator_address=HOST:PORT, --num_processes and --process_id "
        "on every process, or --multihost=no.")
  if before_join is not None:
    before_join()
  jax.distributed.initialize(**given, **options)
  logging.info("Process %d of %d (%s); %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               detect() or "explicit arguments", jax.local_device_count(),
               jax.device_count())
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    _connect_cpu_collectives()
  return True


def _connect_cpu_collectives() -> None:
  """Connects the CPU collectives (gloo) now, while the processes are in
  step: gloo gives up if one comes 30 s late, as compiling can on a loaded
  machine."""
  mesh = sharding.make_mesh()
  ones = jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh),
      np.ones((jax.local_device_count(),), np.int32))
  total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"CPU collectives: {int(total)} devices answered, not "
                       f"{jax.device_count()}.")


def shared_decision(value: int) -> int:
  """Process 0's `value` on every process (once per run, at start-up)."""
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (same answer everywhere)."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
