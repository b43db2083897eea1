r"""Prepares a TFDS dataset once, on one host, through the TFDS Python API.

  python -m byol_jax.prepare --dataset=cifar10
  python -m byol_jax.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_archives --data_dir=gs://BUCKET/tfds

Unlike `tfds build` (TFDS 4.9.10), this needs no Apache Beam. ImageNet needs
the files its instructions name in --manual_dir (run without it to see them).
"""
import importlib
import os
import socket
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


def _builder(name: str, data_dir: Optional[str]):
  """TFDS's builder, with TensorFlow kept off JAX's accelerators."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # devices already in use: leave them.
    pass
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
        f"Unknown TFDS dataset {name!r}; use a TFDS name (e.g. 'cifar10', "
        "'imagenet2012') or --config.data.source=folder/npz.") from e


def _is_prepared(builder) -> bool:
  # Else TFDS warns about a missing dataset_info.json.
  return builder.data_path.exists() and builder.is_prepared()


def _unreachable_url(builder) -> Optional[str]:
  """The first download URL whose host (or proxy) does not answer: in
  seconds, where TFDS would retry for about 200 s."""
  proxies = urllib.request.getproxies()
  answered = set()
  for url in sorted(builder.url_infos or {}):
    target = parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      continue
    if parts.scheme in proxies and not urllib.request.proxy_bypass(
        parts.hostname):
      target = urllib.parse.urlsplit(proxies[parts.scheme])
    address = (target.hostname,
               target.port or (443 if target.scheme == "https" else 80))
    if address not in answered:
      try:
        socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
      except OSError:
        return url
      answered.add(address)
  return None


def _download_and_prepare(builder, name: str,
                          manual_dir: Optional[str]) -> None:
  """Downloads and prepares dataset `name`; ConfigError if that fails."""
  import requests  # pylint: disable=g-import-not-at-top  (TFDS's downloader)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  url = _unreachable_url(builder)
  if url is not None:
    raise ConfigError(
        f"Cannot download TFDS dataset {builder.name!r}: {url} is unreachable "
        f"(no network?). If {_OFFLINE}.")
  where = os.fspath(builder.data_dir_root)
  print(f"Preparing TFDS dataset {name} in {where}.", flush=True)
  tfds.display_progress_bar(True)
  # Into a bucket: the downloads and their extraction stay on this machine
  # (TFDS's local default); only the prepared dataset goes to the bucket.
  download_dir = (os.path.expanduser("~/tensorflow_datasets/downloads")
                  if storage.is_remote(where) else None)
  try:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except (requests.RequestException, tfds.download.DownloadError) as e:
    text = " ".join(str(e).split())[:200]
    raise ConfigError(
        f"Downloading TFDS dataset {builder.name!r} failed "
        f"({type(e).__name__}: {text}). If {_OFFLINE}.") from e
  splits = ", ".join(f"{name} {split.num_examples}"
                     for name, split in sorted(builder.info.splits.items()))
  print(f"Prepared {name} in {where}: {splits} examples.", flush=True)


def ensure_prepared(data_cfg: Any) -> None:
  """Prepares config.data's TFDS dataset if TFDS can download it itself;
  else (or offline, or on several processes) one ConfigError line."""
  if data_cfg.source != "tfds":
    return
  name = data_cfg.name
  builder = _builder(name, data_cfg.get("data_dir") or None)
  if _is_prepared(builder):
    return
  where = os.fspath(builder.data_dir_root)
  command = f"python -m byol_jax.prepare --dataset={name} --data_dir={where}"
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = os.path.join(where, "downloads", "manual")
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
  _download_and_prepare(builder, name, None)


def prepare_dataset(name: str, data_dir: Optional[str] = None,
                    manual_dir: Optional[str] = None) -> None:
  """What `python -m byol_jax.prepare` does; a ConfigError for a manual
  download carries TFDS's `instructions`."""
  builder = _builder(name, data_dir)
  where = os.fspath(builder.data_dir_root)
  if _is_prepared(builder):
    print(f"{name} is already prepared in {where}.")
    return
  manual = manual_dir or os.path.join(where, "downloads", "manual")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
      epath.Path(manual).is_dir() and any(epath.Path(manual).iterdir())):
    error = ConfigError(
        f"{name} needs the files named below in {manual}: download them "
        "there (or give --manual_dir=DIR) and run this command again.")
    error.instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
    raise error
  _download_and_prepare(builder, name, manual)
  print(f"Train with --config.data.name={name} --config.data.data_dir={where}")


def _define_flags() -> None:
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
