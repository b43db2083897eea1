"""Test set-up: 8 fake CPU devices (set before JAX is imported), real data,
one tiny config and one tiny trained workdir per pytest run.

Real images come from $BYOL_JAX_TEST_DATA or ../shared/datasets (the packs
described in ../shared/datasets/README.md). Without them, `testdata.py`
prepares a small real subset through TFDS once into a cache; without data
and without network, data-dependent tests are skipped with one line.
"""
import fcntl
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# The tests' programs are tiny, so compiling is most of their time:
# testlib.FAST_COMPILE_FLAGS (imported below, after the flags are set).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A persistent compilation cache shared by the tests and the trainer processes
# they start: each tiny program compiles once per session, not once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"byol_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from byol_jax import data  # noqa: E402
from byol_jax.data import augment  # noqa: E402

import testdata  # noqa: E402  (tests/testdata.py)
from testlib import CONFIGS, NARROW, REPO, TRAINED_STEPS  # noqa: E402
from testlib import load_config, train_env  # noqa: E402

# The README's command runs test files on two xdist workers, handing out
# whole files in collection order: the longest (their summed test times on a
# cold run) go first, so that neither worker is left alone with one at the end.
_LONGEST_FIRST = ("test_pod.py", "test_run_safety.py", "test_new_user.py",
                  "test_data_pipeline.py", "test_multihost.py",
                  "test_tpu_aot.py", "test_learning.py", "test_convert.py", "test_train.py",
                  "test_loop.py", "test_evaluation.py", "test_commands.py",
                  "test_step.py",
                  "test_benchmarks.py", "test_notebook.py",
                  "test_properties.py", "test_models.py",
                  "test_convert_torch.py", "test_data_augment.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def datasets_dir() -> pathlib.Path:
  return testdata.datasets_dir()


@pytest.fixture(scope="session")
def cifar_npz(datasets_dir) -> pathlib.Path:
  return datasets_dir / "cifar10_small.npz"


@pytest.fixture(scope="session")
def imagenette_npz(datasets_dir) -> pathlib.Path:
  return datasets_dir / "imagenette_small.npz"


@pytest.fixture(scope="session")
def nette_folder(tmp_path_factory, imagenette_npz):
  """ROOT/{train,val}/<synset>/*.JPEG: the Imagenette subset as a folder."""
  root = tmp_path_factory.mktemp("nette_folder")
  with np.load(imagenette_npz) as d:
    for split in ("train", "val"):
      off, jpeg = d[f"{split}_offsets"], d[f"{split}_jpeg"]
      for i, name in enumerate(d[f"{split}_names"]):
        path = root / split / str(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg[off[i]:off[i + 1]].tobytes())
  return root


@pytest.fixture(scope="session")
def nette_64(imagenette_npz):
  """8 real Imagenette val images at 64 x 64, normalised [8, 64, 64, 3]."""
  with np.load(imagenette_npz) as d:
    jpeg, off = d["val_jpeg"], d["val_offsets"]
    out = []
    for i in range(0, 80, 10):  # one image of each of 8 classes
      img = Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes()))
      out.append(np.asarray(img.convert("RGB").resize((64, 64),
                                                       Image.BILINEAR)))
  return np.asarray(augment.normalize(np.stack(out).astype(np.float32) / 255))


@pytest.fixture(scope="session")
def tiny_config(cifar_npz):
  """tiny_config(method='byol', **overrides): configs/tiny.py, narrowed.

  Overrides use dotted names with '__' (model__num_filters=8).
  """
  def make(method="byol", batch=NARROW["batch"], **overrides):
    c = load_config("tiny", f"method={method},batch={batch}")
    c.data.path = str(cifar_npz)
    c = data.resolve(c)  # 10 classes and 'test', from the data.
    c.model.num_filters = NARROW["filters"]
    c.projector.hidden_dim = NARROW["hidden"]
    c.predictor.hidden_dim = NARROW["hidden"] if method != "simsiam" else 8
    c.knn.k = 10
    for key, value in overrides.items():
      *parents, leaf = key.split("__")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    return c
  return make


@pytest.fixture(scope="session")
def train_cmd(cifar_npz):
  """train_cmd(workdir, arg='', *flags, narrow=True): the trainer's argv.

  Narrow runs leave the kNN monitor off (it is most of a short run's
  evaluation); a flag in `flags` turns it on again.
  """
  def make(workdir, arg="", *extra, narrow=True):
    base = (f"batch={NARROW['batch']}" if narrow else "")
    arg = ",".join(a for a in (f"path={cifar_npz}", base, arg) if a)
    narrowing = ([f"--config.model.num_filters={NARROW['filters']}",
                  f"--config.projector.hidden_dim={NARROW['hidden']}",
                  f"--config.predictor.hidden_dim={NARROW['hidden']}",
                  "--config.knn.k=10", "--config.knn.enabled=False"]
                 if narrow else [])
    return [sys.executable, "-m", "byol_jax.train",
            f"--config={CONFIGS / 'tiny.py'}:{arg}", f"--workdir={workdir}",
            *narrowing, *extra]
  return make


@pytest.fixture(scope="session")
def run_train(train_cmd):
  """run_train(workdir, arg='', *flags, check=True, devices=8, timeout=600,
  narrow=True, optimize=False)."""
  def run(workdir, arg="", *extra, check=True, devices=8, timeout=600,
          narrow=True, optimize=False):
    proc = subprocess.run(train_cmd(workdir, arg, *extra, narrow=narrow),
                          cwd=REPO, env=train_env(devices, optimize),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
      raise AssertionError(f"train failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr[-5000:]}")
    return proc
  return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, run_train):
  """One tiny BYOL run of TRAINED_STEPS steps through the CLI, per pytest run.

  Shared by the xdist workers: the first to take the lock trains, the others
  wait for it and read the same workdir. Returns (workdir, completed
  process). Tests that change it work on a copy (`trained_copy`).
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent            # The run's folder, above the workers' own.
  root = base / "trained"
  root.mkdir(exist_ok=True)
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    record = root / "process.json"
    if not record.exists():
      proc = run_train(root / "run", f"steps={TRAINED_STEPS}",
                       "--config.checkpoint_every_steps=8",
                       "--config.log_every_steps=4", "--profile_steps=2:4",
                       "--config.knn.enabled=True", devices=2)
      record.write_text(json.dumps(dict(
          args=proc.args, returncode=proc.returncode, stdout=proc.stdout,
          stderr=proc.stderr)))
    proc = subprocess.CompletedProcess(**json.loads(record.read_text()))
  return root / "run", proc


@pytest.fixture
def trained_copy(trained_run, tmp_path):
  """A private copy of the session's trained workdir."""
  dst = tmp_path / "run"
  shutil.copytree(trained_run[0], dst)
  return dst


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """gs://byol-test: a local GCS emulator (gcp-storage-emulator, in memory),
  one per pytest process, serving this process and the trainers it starts
  (tests/gcs_emulator.py: the emulator, with the generation header that
  tensorstore needs).

  Sets STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage, tensorboardX) and
  TENSORSTORE_GCS_HTTP_URL (Orbax's arrays) in os.environ. Returns the
  bucket's URL.
  """
  try:
    import gcp_storage_emulator  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.fail("gcp-storage-emulator is not installed: pip install -e "
                "'.[test]' (as .ci/run does).")
  port, proxy_port = _free_port(), _free_port()
  root = tmp_path_factory.mktemp("gcs")
  log = root / "emulator.log"
  # TensorFlow's GCS filesystem reaches it through an HTTPS proxy whose
  # certificate TensorFlow's curl trusts (CURL_CA_BUNDLE): `tf_gcs_env`.
  cert, key = root / "cert.pem", root / "key.pem"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                  "-keyout", str(key), "-out", str(cert), "-days", "2",
                  "-subj", "/CN=googleapis.com", "-addext",
                  "subjectAltName=DNS:www.googleapis.com,"
                  "DNS:storage.googleapis.com"],
                 check=True, capture_output=True)
  with open(log, "wb") as f:
    proc = subprocess.Popen([sys.executable,
                             str(REPO / "tests" / "gcs_emulator.py"),
                             f"--tf_proxy={proxy_port}:{cert}:{key}",
                             "start", "--port", str(port), "--host",
                             "localhost", "--default-bucket", "byol-test",
                             "--in-memory", "--quiet"],
                            stdout=f, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("localhost", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, (
          log.read_text())
      time.sleep(0.1)
  url = f"http://localhost:{port}"
  env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
             GOOGLE_CLOUD_PROJECT="byol-test")
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  proxy = f"http://localhost:{proxy_port}"
  _TF_GCS_ENV.update(https_proxy=proxy, HTTPS_PROXY=proxy,
                     no_proxy="localhost,127.0.0.1",
                     NO_PROXY="localhost,127.0.0.1", CURL_CA_BUNDLE=str(cert),
                     GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
  yield "gs://byol-test"
  for k, v in before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=30)


_TF_GCS_ENV = {}


@pytest.fixture(scope="session")
def tf_gcs_env(gcs_bucket):  # pylint: disable=unused-argument
  """Environment variables with which a subprocess's TensorFlow GCS
  filesystem (TFDS's record files) reaches `gcs_bucket`'s emulator: an HTTPS
  proxy (tests/gcs_emulator.py) and a token instead of credentials. Not set
  in this process: other tests must not go through the proxy."""
  return dict(_TF_GCS_ENV)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path):
  """fill(free_kib): an 8 MiB tmpfs folder filled to leave `free_kib` KiB.

  Yields (folder, fill). Skipped with one line where mounting is not
  permitted (not root, or a container without CAP_SYS_ADMIN).
  """
  disk = tmp_path / "disk"
  disk.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                         str(disk)], capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip("cannot mount a small tmpfs here (needs root): "
                f"{proc.stderr.strip()[:100]}")

  def fill(free_kib: int) -> pathlib.Path:
    filler = disk / "filler"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - free_kib * 1024
    with open(filler, "ab") as f:
      f.write(b"\0" * max(size, 0))
    return filler
  try:
    yield disk, fill
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
