"""Where a benchmark ran: the commit and the library versions.

No JAX here: benchmarks/gpu_suite.py imports it and must not initialise a
backend (it would hold the GPU's memory while the stages run).
"""
import importlib.metadata
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fmt(x, scale: float = 1.0, digits: int = 2) -> str:
  """x / scale with `digits` decimals for a table cell; 'n/a' for None."""
  return "n/a" if x is None else f"{x / scale:.{digits}f}"


def commit() -> str:
  """The checkout's commit; $BENCH_COMMIT where the copy has no .git."""
  try:
    out = subprocess.check_output(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO,
        stderr=subprocess.DEVNULL)
    return out.decode().strip()
  except (OSError, subprocess.CalledProcessError):
    return os.environ.get("BENCH_COMMIT", "unknown")


def versions() -> dict:
  """Versions of Python and the libraries the step depends on."""
  found = {}
  for name in ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint",
               "numpy"):
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  found["python"] = platform.python_version()
  return found
