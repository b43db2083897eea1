"""Bucket paths (gs://): which client reads and writes them.

Every file operation of byol_jax on a bucket goes through `etils.epath`,
pointed at gcsfs (fsspec) instead of TensorFlow's own GCS filesystem by
`EPATH_USE_TF=false` (byol_jax/environ.py) unless the user set it. Orbax uses the same
epath for its directories and tensorstore for the arrays; tensorboardX uses
google-cloud-storage. All three talk to real GCS with the machine's
credentials (a TPU VM's service account), and all three follow one emulator:
`STORAGE_EMULATOR_HOST=http://HOST:PORT` (read by gcsfs and
google-cloud-storage; copied here to `TENSORSTORE_GCS_HTTP_URL` for
tensorstore), which is how tests/ rehearses a pod's gs:// workdir.

TensorFlow's GCS filesystem (hard-wired to googleapis.com) is left to what
only TensorFlow can read: TFDS's record files (`prepare --data_dir=gs://` and
training from that data_dir). README.md says which path uses which.
"""
import importlib.util
import os

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
  """Makes sure a bucket path can be used, before anything starts.

  Args:
    path: a local path (nothing to check) or gs://BUCKET/...
    flag: the flag that gave it, for the message.

  Raises:
    ConfigError: another scheme, or the GCS client is not installed (one
      line naming the install command).
  """
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
