r"""Prepares a TFDS dataset once, on one host, through the TFDS Python API.

  python -m byol_jax.prepare --dataset=cifar10
  python -m byol_jax.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_archives --data_dir=gs://BUCKET/tfds

It calls `tfds.builder(...).download_and_prepare(...)`, which needs no Apache
Beam: the `tfds build` command of TFDS 4.9.10 stops at import with "No module
named 'apache_beam'" (tensorflow/datasets#5463). Datasets that TFDS downloads
by itself (CIFAR-10/100, Imagenette, STL-10 ...) need only --dataset; those
that need a manual download (ImageNet) need the files their instructions name
in --manual_dir (run without it to print the instructions).

`ensure_prepared(config.data)` is what the trainer calls before it builds its
input: it returns at once when the dataset is prepared, downloads and
prepares what TFDS can download by itself, and otherwise raises one
ConfigError line saying what to do.
"""
import importlib
import os
import socket
import sys
import urllib.parse
import urllib.request
from typing import Any, Optional

import jax
from absl import flags
from etils import epath

from byol_jax import storage
from byol_jax.errors import ConfigError
from byol_jax.trainer import cli

_OFFLINE = ("offline, train from local images with --config.data.source=folder "
            "(or npz) and --config.data.path=PATH, or point "
            "--config.data.data_dir at a prepared TFDS directory")
_PROBE_TIMEOUT_S = 10


def _tfds():
  """Imports TFDS (optional, heavy: the 'tf' extra), hiding TF's GPUs/TPUs.

  TFDS writes its files through TensorFlow; TensorFlow must not take the
  accelerators' memory from JAX in the trainer's process.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # devices already in use: leave them.
    pass
  return tfds


def _builder(name: str, data_dir: Optional[str]):
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
        f"Unknown TFDS dataset {name!r}; use a TFDS name (e.g. 'cifar10', "
        "'imagenet2012') or --config.data.source=folder/npz.") from e


def _is_prepared(builder) -> bool:
  # TFDS warns about a missing dataset_info.json even when the dataset's
  # folder does not exist: ask only when it does.
  return builder.data_path.exists() and builder.is_prepared()


def _where(builder) -> str:
  return os.fspath(builder.data_dir_root)


def _manual_dir(builder, manual_dir: Optional[str]) -> str:
  """Where TFDS looks for manually downloaded files (its default if None)."""
  return manual_dir or os.path.join(_where(builder), "downloads", "manual")


def _has_files(directory: str) -> bool:
  path = epath.Path(directory)  # local or gs://
  return path.is_dir() and any(path.iterdir())


def _unreachable_url(builder) -> Optional[str]:
  """The first registered download URL whose host (or proxy) does not answer.

  TFDS retries a failed download for about 200 s; the hosts of the URLs a
  dataset registers (its checksums file) tell within seconds whether this
  machine is offline. A dataset that registers none is not probed.
  """
  proxies = urllib.request.getproxies()
  answered = set()
  for url in sorted(builder.url_infos or {}):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      continue
    target = parts
    if parts.scheme in proxies and not urllib.request.proxy_bypass(
        parts.hostname):
      target = urllib.parse.urlsplit(proxies[parts.scheme])
    address = (target.hostname,
               target.port or (443 if target.scheme == "https" else 80))
    if address in answered:
      continue
    try:
      socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
      return url
    answered.add(address)
  return None


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:200]}"


def _check_reachable(builder) -> None:
  url = _unreachable_url(builder)
  if url is not None:
    raise ConfigError(
        f"Cannot download TFDS dataset {builder.name!r}: {url} is unreachable "
        f"(no network?). If {_OFFLINE}.")


def download_and_prepare(builder, manual_dir: Optional[str] = None) -> None:
  """Downloads and prepares `builder`'s dataset, with TFDS's progress bars.

  Raises:
    ConfigError: the download failed (one line with the offline options).
  """
  import requests  # pylint: disable=g-import-not-at-top  (TFDS's downloader)
  tfds = _tfds()
  tfds.display_progress_bar(True)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  # Into a bucket: the downloads and their extraction stay on this machine
  # (TFDS's local default); only the prepared dataset goes to the bucket.
  download_dir = (os.path.join(os.path.expanduser("~"), "tensorflow_datasets",
                               "downloads")
                  if storage.is_remote(_where(builder)) else None)
  try:
    builder.download_and_prepare(download_dir=download_dir,
                                 download_config=config)
  except (requests.RequestException, tfds.download.DownloadError) as e:
    raise ConfigError(
        f"Downloading TFDS dataset {builder.name!r} failed ({_one_line(e)}). "
        f"If {_OFFLINE}.") from e


def _splits(builder) -> str:
  return ", ".join(f"{name} {split.num_examples}"
                   for name, split in sorted(builder.info.splits.items()))


def ensure_prepared(data_cfg: Any) -> None:
  """Makes sure config.data's TFDS dataset is prepared (no-op for others).

  Cheap when it is prepared (it reads dataset_info.json in data_dir, also
  from a gs:// bucket); downloads and prepares a dataset TFDS can download by
  itself, in this process, with a progress display.

  Args:
    data_cfg: `config.data` (source, name, data_dir).

  Raises:
    ConfigError: one line: unknown name, a manual download is needed, several
      processes would prepare it at once, or the download failed (offline).
  """
  if data_cfg.source != "tfds":
    return
  name = data_cfg.name
  builder = _builder(name, data_cfg.get("data_dir") or None)
  if _is_prepared(builder):
    return
  where = _where(builder)
  command = f"python -m byol_jax.prepare --dataset={name} --data_dir={where}"
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = _manual_dir(builder, None)
    raise ConfigError(
        f"TFDS dataset {name!r} is not prepared in {where} and needs a manual "
        f"download: put the files it names (`{command}` prints them) in "
        f"{manual}, run `{command} --manual_dir={manual}`, or point "
        "--config.data.data_dir at a prepared copy.")
  if jax.process_count() > 1:
    raise ConfigError(
        f"TFDS dataset {name!r} is not prepared in {where}; prepare it once "
        f"with `{command}` (one host; a gs:// data_dir serves all hosts), "
        "then start the run again.")
  _check_reachable(builder)
  print(f"Preparing TFDS dataset {name} in {where} (first use only).",
        flush=True)
  download_and_prepare(builder)
  print(f"Prepared {name}: {_splits(builder)} examples.", flush=True)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
def _define_flags() -> None:
  """The command's flags (defined only when run: the trainer imports this)."""
  flags.DEFINE_string("dataset", None, "TFDS name, e.g. cifar10, "
                      "imagenette/320px-v2, imagenet2012.")
  flags.DEFINE_string(
      "data_dir", None, "Where the prepared dataset goes (a local directory "
      "or gs://BUCKET/DIR); default: TFDS's ($TFDS_DATA_DIR or "
      "~/tensorflow_datasets).")
  flags.DEFINE_string(
      "manual_dir", None, "Directory holding manually downloaded files "
      "(ImageNet's ILSVRC2012_img_train.tar, ...); default: "
      "DATA_DIR/downloads/manual.")
  flags.DEFINE_list("imports", [], "Python modules to import first: they "
                    "register your own TFDS builders.")


def prepare_dataset(name: str, data_dir: Optional[str] = None,
                    manual_dir: Optional[str] = None) -> None:
  """What `python -m byol_jax.prepare` does, with TFDS's progress display.

  Args:
    name: a TFDS name, e.g. 'cifar10' or 'imagenet2012'.
    data_dir: where the prepared dataset goes (local or gs://); None: TFDS's.
    manual_dir: manually downloaded files; None: DATA_DIR/downloads/manual.

  Raises:
    ConfigError: one line; for a manual download TFDS's instructions are
      in its `instructions` attribute (the command prints them after it).
  """
  builder = _builder(name, data_dir)
  where = _where(builder)
  if _is_prepared(builder):
    print(f"{name} is already prepared in {where}: {_splits(builder)} "
          "examples.")
    return
  manual = _manual_dir(builder, manual_dir)
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not _has_files(manual):
    error = ConfigError(
        f"{name} needs the files named below in {manual}: download them "
        "there (or give --manual_dir=DIR) and run this command again.")
    error.instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
    raise error
  _check_reachable(builder)
  print(f"Preparing {name} in {where}.", flush=True)
  download_and_prepare(builder, manual)
  print(f"Prepared {name} in {where}: {_splits(builder)} examples. Train "
        f"with --config.data.name={name} --config.data.data_dir={where}")


def main(argv) -> None:
  del argv  # Flags only (cli.run).
  args = flags.FLAGS
  if not args.dataset:
    cli.exit_error("give --dataset=NAME (a TFDS name, e.g. cifar10).",
                   cli.EXIT_USAGE)
  for module in args.imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      cli.exit_error(f"--imports: cannot import {module!r} ({e}); put it on "
                     "PYTHONPATH or fix the name.", cli.EXIT_USAGE)
  storage.check(args.data_dir or "", "--data_dir")
  prepare_dataset(args.dataset, args.data_dir, args.manual_dir)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
