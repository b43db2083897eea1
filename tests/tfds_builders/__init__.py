"""Small TFDS datasets over real images, for the dataset-preparation tests.

Importing this package registers three TFDS builders (not yet prepared
anywhere):

- `byol_test_manual`: Imagenette images (../shared/datasets/
  imagenette_small.npz) from manually downloaded archives, like imagenet2012:
  `write_manual_archives` writes them.
- `byol_test_download`: CIFAR-10 images (cifar10_small.npz) that TFDS
  downloads by itself, like cifar10: `dl_manager.download_and_extract` on
  the URL in $BYOL_JAX_TEST_DOWNLOAD_URL (`write_download_archive` writes
  the archive, `serve` serves a directory over HTTP).
- `byol_test_offline` (its own folder, with the checksums file that
  registers its URL, as TFDS's catalog datasets have): its URL is
  unreachable, as every URL is on a machine without network.
"""
import contextlib
import functools
import http.server
import io
import os
import pathlib
import tarfile
import threading

import numpy as np
import tensorflow_datasets as tfds

DOWNLOAD_URL_ENV = "BYOL_JAX_TEST_DOWNLOAD_URL"
DOWNLOAD_ARCHIVE = "byol_test_download.tar.gz"
MANUAL_ARCHIVES = {"train": "imagenette_train.tar",
                   "validation": "imagenette_val.tar"}


def _jpegs(npz, split: str):
  """(jpeg bytes, label) of every image of `split` in an .npz pack."""
  off = npz[f"{split}_offsets"]
  data = npz[f"{split}_jpeg"]
  for i, label in enumerate(npz[f"{split}_labels"]):
    yield data[off[i]:off[i + 1]].tobytes(), int(label)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_manual_archives(imagenette_npz, manual_dir) -> dict:
  """Writes imagenette_{train,val}.tar (SYNSET/NAME.JPEG) into manual_dir.

  Returns:
    {split: number of images}.
  """
  npz = np.load(imagenette_npz)
  classes = [str(c) for c in npz["class_names"]]
  os.makedirs(manual_dir, exist_ok=True)
  sizes = {}
  for split, npz_split in (("train", "train"), ("validation", "val")):
    names = [str(n).split("/")[-1] for n in npz[f"{npz_split}_names"]]
    with tarfile.open(os.path.join(manual_dir, MANUAL_ARCHIVES[split]),
                      "w") as tar:
      for (jpeg, label), name in zip(_jpegs(npz, npz_split), names):
        _add(tar, f"{classes[label]}/{name}", jpeg)
    sizes[split] = len(names)
  return sizes


def write_download_archive(cifar_npz, directory, n_train: int = 200,
                           n_test: int = 100) -> str:
  """Writes DIRECTORY/byol_test_download.tar.gz: SPLIT/LABEL/I.jpg files."""
  npz = np.load(cifar_npz)
  path = os.path.join(directory, DOWNLOAD_ARCHIVE)
  with tarfile.open(path, "w:gz") as tar:
    for split, n in (("train", n_train), ("test", n_test)):
      for i, (jpeg, label) in enumerate(_jpegs(npz, split)):
        if i == n:
          break
        _add(tar, f"cifar_subset/{split}/{label}/{i:05d}.jpg", jpeg)
  return path


@contextlib.contextmanager
def serve(directory):
  """Serves `directory` over HTTP on 127.0.0.1; yields its base URL."""
  handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_port}"
  finally:
    server.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


def _image_features(num_classes=None, names=None):
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3),
                                   encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=num_classes, names=names),
  })


class ByolTestManual(tfds.core.GeneratorBasedBuilder):
  """Imagenette subset prepared from manually downloaded archives."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put imagenette_train.tar and imagenette_val.tar (tests/tfds_builders:"
      " write_manual_archives) in the manual directory.")
  CLASSES = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
             "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")

  def _info(self):
    return self.dataset_info_from_configs(
        features=_image_features(names=self.CLASSES),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(
        dl_manager.iter_archive(dl_manager.manual_dir / archive))
            for split, archive in MANUAL_ARCHIVES.items()}

  def _generate_examples(self, archive):
    for name, fobj in archive:
      synset = pathlib.PurePosixPath(name).parent.name
      yield name, {"image": fobj, "label": synset}


class ByolTestDownload(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 subset that TFDS downloads from $BYOL_JAX_TEST_DOWNLOAD_URL."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=_image_features(num_classes=10),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    root = dl_manager.download_and_extract(os.environ[DOWNLOAD_URL_ENV])
    return {split: self._generate_examples(root / "cifar_subset" / split)
            for split in ("train", "test")}

  def _generate_examples(self, directory):
    for path in sorted(directory.glob("*/*.jpg")):
      yield path.name, {"image": path, "label": int(path.parent.name)}


# Registers byol_test_offline (its own folder: TFDS finds a dataset's
# checksums.tsv next to its builder's file).
from tfds_builders.byol_test_offline import byol_test_offline_dataset_builder  # noqa: E402,F401,E501  pylint: disable=wrong-import-position
