"""--multihost=auto joins where JAX's cluster detection finds several processes.

Each platform's environment is set up the way JAX reads it: SLURM and Open
MPI through their variables, JAX_COORDINATOR_ADDRESS, and Cloud TPU VMs
through the GCE metadata server, stubbed here by a local HTTP server that
answers the paths JAX queries (JAX's own GCE_METADATA_IP points it there).
Only the decision is tested; tests/test_multihost.py joins for real.
"""
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from byol_jax.trainer import multihost
from byol_jax.errors import ConfigError
from testlib import REPO

# Variables any of JAX's cluster environments reads.
_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR",
             "KUBERNETES_SERVICE_HOST", "GCE_METADATA_IP")


def _plain_env() -> dict:
  return {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}


@pytest.fixture
def plain(monkeypatch):
  """A plain machine: none of the cluster variables set."""
  for k in os.environ:
    if k.startswith(_PREFIXES):
      monkeypatch.delenv(k)
  return monkeypatch


class _Metadata(http.server.BaseHTTPRequestHandler):
  """GCE metadata server: /computeMetadata/v1/instance/attributes/KEY."""
  attributes: dict = {}
  requests: list = []

  def do_GET(self):  # noqa: N802 (http.server's name)
    self.requests.append(self.path)
    prefix = "/computeMetadata/v1/instance/attributes/"
    key = self.path[len(prefix):] if self.path.startswith(prefix) else None
    if self.headers.get("Metadata-Flavor") != "Google":
      self.send_response(403)
      body = b""
    elif key in self.attributes:
      self.send_response(200)
      body = self.attributes[key].encode()
    else:
      self.send_response(404)
      body = b""
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    del args


def _serve(attributes: dict):
  handler = type("Handler", (_Metadata,), {"attributes": attributes,
                                            "requests": []})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, handler


def _tpu_vm(accelerator: str, worker: int, ips: list, slices: int = 1):
  tpu_env = [f"ACCELERATOR_TYPE: '{accelerator}'", f"WORKER_ID: '{worker}'"]
  if slices > 1:
    tpu_env += [f"MEGASCALE_NUM_SLICES: '{slices}'", "MEGASCALE_SLICE_ID: '0'"]
  return {
      "agent-worker-number": str(worker),
      # name:id:ip triples, as JAX's parser reads them.
      "worker-network-endpoints": ",".join(
          f"w{i}:8470:{ip}" for i, ip in enumerate(ips)),
      "tpu-env": "\n".join(tpu_env) + "\n",
  }


def test_plain_machine_does_not_join(plain):
  server, handler = _serve(_tpu_vm("v4-16", 0, ["10.0.0.2", "10.0.0.3"]))
  try:
    plain.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
    assert multihost.detect() is None
    assert not multihost.should_join("auto")
    assert not multihost.initialize("auto")
    # Not a TPU VM: the metadata server is never asked.
    assert handler.requests == []
  finally:
    server.shutdown()


@pytest.mark.parametrize("env, name, join", [
    # srun of 2 tasks on two nodes (what JAX's SlurmCluster reads).
    (dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-002]",
          SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0"),
     "SlurmCluster", True),
    # srun of a single task: one process, nothing to join.
    (dict(SLURM_JOB_ID="4243", SLURM_STEP_NODELIST="gpu001",
          SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0"),
     "SlurmCluster", False),
    # mpirun -np 4 (Open MPI 4).
    (dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
          OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2",
          OMPI_COMM_WORLD_LOCAL_RANK="0"),
     "OmpiCluster", True),
    (dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234"),
     "JAX_COORDINATOR_ADDRESS", True),
])
def test_cluster_variables(plain, env, name, join):
  for k, v in env.items():
    plain.setenv(k, v)
  assert multihost.detect() == name
  assert multihost.should_join("auto") is join
  assert multihost.should_join("no") is False


def test_explicit_arguments_join_and_yes_without_a_cluster_is_one_line(plain):
  assert multihost.should_join("auto", coordinator_address="h:1234")
  assert multihost.should_join("auto", num_processes=2)
  with pytest.raises(ConfigError, match="--num_processes") as e:
    multihost.initialize("yes")
  assert "\n" not in str(e.value)
  plain.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ConfigError, match="--num_processes"):
    multihost.initialize("auto")


@pytest.mark.parametrize("flags, match", [
    (dict(num_processes=2, process_id=5), "--process_id=5 with "
     "--num_processes=2: the ids run from 0 to 1"),
    (dict(mode="no", num_processes=2, process_id=1), "--multihost=no runs "
     "one process, but --num_processes=2 --process_id=1"),
    (dict(mode="no", coordinator_address="h:1234"), "--multihost=no"),
    (dict(num_processes=0), "--num_processes=0"),
    (dict(process_id=-1), "--process_id=-1"),
    (dict(num_processes=2, process_id=1), "nothing names the coordinator"),
    (dict(process_id=1), "--num_processes"),  # An id alone is not ignored.
])
def test_multihost_flags_that_do_not_fit_are_one_line(plain, flags, match):
  """Checked together before JAX is asked (it would raise a traceback or, for
  --multihost=no, run one process silently)."""
  mode = flags.pop("mode", "auto")
  with pytest.raises(ConfigError, match=match) as e:
    multihost.initialize(mode, **flags)
  assert "\n" not in str(e.value)


_PROBE = r"""
import json, os, sys
import jax  # runs JAX's Cloud TPU set-up (JAX_FORCE_TPU_INIT: no chip check)
from jax._src import cloud_tpu_init
assert cloud_tpu_init.running_in_cloud_tpu_vm
# JAX sets this at import when no TPU chip is on the PCI bus; a TPU VM has them.
os.environ.pop("TPU_SKIP_MDS_QUERY", None)
from byol_jax.trainer import multihost
out = {}
for case, address in json.loads(sys.argv[1]).items():
  os.environ["GCE_METADATA_IP"] = address
  out[case] = [multihost.detect(), multihost.should_join("auto")]
# GKE's TPU pods get the worker list in the environment, and
# TPU_SKIP_MDS_QUERY to keep JAX off the node's metadata server.
os.environ.update(TPU_WORKER_HOSTNAMES="h0,h1", TPU_WORKER_ID="0",
                  TPU_SKIP_MDS_QUERY="true")
out["gke"] = [multihost.detect(), multihost.should_join("auto")]
print(json.dumps(out))
"""


def test_cloud_tpu_vm_through_the_metadata_server():
  vms = {
      "v4-16 worker 1": _tpu_vm("v4-16", 1, ["10.0.0.2", "10.0.0.3"]),
      "v3-8": _tpu_vm("v3-8", 0, ["10.0.0.2"]),
      "2 slices of v5litepod-8": _tpu_vm("v5litepod-8", 0, ["10.0.0.2"], 2),
  }
  servers = {case: _serve(attrs) for case, attrs in vms.items()}
  try:
    env = dict(_plain_env(), JAX_FORCE_TPU_INIT="1", JAX_PLATFORMS="cpu",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    addresses = {case: f"127.0.0.1:{s.server_port}"
                 for case, (s, _) in servers.items()}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(addresses)], env=env,
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
  finally:
    for server, _ in servers.values():
      server.shutdown()
  assert out == {
      "v4-16 worker 1": ["GceTpuCluster", True],
      "v3-8": ["GceTpuCluster", False],  # one host: runs alone
      "2 slices of v5litepod-8": ["GceTpuCluster", True],
      "gke": ["GkeTpuCluster", True],
  }
  # JAX asked the metadata server the way a TPU VM answers it.
  asked = servers["v4-16 worker 1"][1].requests
  assert any(p.endswith("/worker-network-endpoints") for p in asked)
