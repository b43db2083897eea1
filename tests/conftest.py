"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A persistent compilation cache shared by the tests and the trainer processes
# they start: each tiny program compiles once per session, not once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"byol_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BYOL_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def cifar_npz() -> pathlib.Path:
  path = DATASETS / "cifar10_small.npz"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: tests need ../shared/datasets")
  return path


@pytest.fixture(scope="session")
def imagenette_npz() -> pathlib.Path:
  path = DATASETS / "imagenette_small.npz"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: tests need ../shared/datasets")
  return path
