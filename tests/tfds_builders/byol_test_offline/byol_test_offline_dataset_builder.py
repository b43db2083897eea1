"""A dataset TFDS would download from a URL that does not answer.

Its checksums.tsv registers the URL, as every TFDS catalog dataset registers
its downloads; port 9 (discard) has no server on the test machines.
"""
import tensorflow_datasets as tfds

URL = "http://127.0.0.1:9/byol_test_offline.tar.gz"


class ByolTestOffline(tfds.core.GeneratorBasedBuilder):
  """Like cifar10 on a machine without network."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    root = dl_manager.download_and_extract(URL)
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root):
    for path in sorted(root.glob("*/*.png")):
      yield path.name, {"image": path, "label": int(path.parent.name)}
