"""Bucket paths (gs://): epath on gcsfs, Orbax's tensorstore and
tensorboardX's google-cloud-storage, all following one emulator,
STORAGE_EMULATOR_HOST (how tests/ rehearse a pod's gs:// workdir).
"""
import importlib.util
import os
import sys

import fsspec

from byol_jax.errors import ConfigError

# No cached listings: checkpoints appear while a run writes them (a reader
# that listed the bucket once would not see the newer steps).
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault(
      "use_listings_cache", False)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TENSORSTORE_ENV = "TENSORSTORE_GCS_HTTP_URL"
INSTALL = "pip install 'byol_jax[gcs]'"
# What gs:// needs: epath's fsspec backend (gcsfs), tensorboardX's writer.
_CLIENTS = {"gcsfs": "gcsfs", "google.cloud.storage": "google-cloud-storage"}


def is_remote(path) -> bool:
  """Whether `path` names an object store (gs://, s3:// ...)."""
  return "://" in os.fspath(path)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # A missing parent package.
    return False


def check(path, flag: str = "--workdir") -> None:
  """Raises ConfigError (one line) if `path`, given by `flag`, is a bucket
  path this machine cannot use: another scheme, or no GCS client."""
  path = os.fspath(path)
  if not is_remote(path):
    return
  if not path.startswith("gs://"):
    raise ConfigError(f"{flag}={path}: only local paths and gs://BUCKET/... "
                      "are supported.")
  missing = [pkg for module, pkg in _CLIENTS.items() if not _installed(module)]
  if missing:
    raise ConfigError(
        f"{flag}={path} needs the Google Cloud Storage client "
        f"({', '.join(missing)} not installed): {INSTALL}, or use a local "
        "directory.")
  emulator = os.environ.get(EMULATOR_ENV)
  if emulator:
    os.environ.setdefault(TENSORSTORE_ENV, emulator if "://" in emulator
                          else f"http://{emulator}")
    # An emulator has no storage-control API for gcsfs to ask a bucket's
    # type (it would warn at every call).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # ... and needs no credentials (tensorstore would log that it has none).
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def quiet_closed_event_loops() -> None:
  """Drops the 'Event loop is closed' errors of TensorStore's callbacks:
  after a failed read or write it completes futures whose asyncio loop
  Orbax has closed, hundreds of tracebacks that say nothing about the run."""
  previous = sys.unraisablehook
  if getattr(previous, "_byol_jax_quiet", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook._byol_jax_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
