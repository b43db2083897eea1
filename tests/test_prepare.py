"""Dataset preparation through the TFDS Python API (byol_jax/prepare.py).

Real TFDS builders over real images (tests/tfds_builders), prepared into a
fresh data_dir: from manual archives by `python -m byol_jax.prepare` without
Apache Beam; by `ensure_prepared` from a URL, as TFDS downloads CIFAR-10; and
one offline error line when the download cannot reach its URL.
"""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import tfds_builders  # noqa: E402  (registers the test datasets)
from byol_jax import prepare  # noqa: E402
from byol_jax.errors import ConfigError  # noqa: E402
from testlib import REPO, noisy_lines  # noqa: E402

# Runs `python -m byol_jax.prepare ARGS` with every import of apache_beam
# refused and recorded; prints the attempts as JSON at exit.
_WITHOUT_BEAM = r"""
import atexit, importlib.abc, json, runpy, sys
attempts = []
class NoBeam(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "apache_beam":
      attempts.append(name)
      raise ModuleNotFoundError(f"No module named {name!r}")
    return None
sys.meta_path.insert(0, NoBeam())
atexit.register(lambda: print("BEAM_IMPORTS " + json.dumps(
    attempts + [m for m in sys.modules if m.startswith("apache_beam")])))
sys.argv = ["prepare"] + sys.argv[1:]
runpy.run_module("byol_jax.prepare", run_name="__main__", alter_sys=True)
"""


def _data_cfg(name, data_dir):
  return ml_collections.ConfigDict(dict(source="tfds", name=name,
                                        data_dir=str(data_dir)))


def _prepare_cli(*args, stderr=subprocess.PIPE):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO / "tests"), str(REPO)]))
  proc = subprocess.run(
      [sys.executable, "-c", _WITHOUT_BEAM, "--imports=tfds_builders", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
      timeout=600, check=False)
  beam = [line for line in proc.stdout.splitlines()
          if line.startswith("BEAM_IMPORTS ")]
  assert beam, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert json.loads(beam[-1].split(" ", 1)[1]) == []
  return proc


def _decoded(ds):
  return [(ex["image"].numpy(), int(ex["label"])) for ex in ds]


def test_manual_dataset_without_its_files_prints_the_instructions(
    tmp_path):
  manual = tmp_path / "archives"
  with pytest.raises(ConfigError) as e:
    prepare.prepare_dataset("byol_test_manual", str(tmp_path / "tfds"),
                            str(manual))
  assert "\n" not in str(e.value) and str(manual) in str(e.value)
  assert e.value.instructions == (
      tfds_builders.ByolTestManual.MANUAL_DOWNLOAD_INSTRUCTIONS.strip())


def test_cli_prepares_from_manual_archives_without_beam(tmp_path,
                                                        imagenette_npz):
  data_dir, manual = tmp_path / "tfds", tmp_path / "archives"
  # Without the archives: the error line first, then TFDS's instructions.
  proc = _prepare_cli("--dataset=byol_test_manual", f"--data_dir={data_dir}",
                      f"--manual_dir={manual}", stderr=subprocess.STDOUT)
  assert proc.returncode == 1
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("error: byol_test_manual needs the files"), (
      proc.stdout[-3000:])
  assert (tfds_builders.ByolTestManual.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
          in proc.stdout)
  assert not noisy_lines(proc.stdout), proc.stdout[-3000:]

  sizes = tfds_builders.write_manual_archives(imagenette_npz, manual)
  proc = _prepare_cli("--dataset=byol_test_manual", f"--data_dir={data_dir}",
                      f"--manual_dir={manual}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Prepared byol_test_manual" in proc.stdout
  # A quiet console: no library INFO, TensorFlow notices or absl lines.
  assert not noisy_lines(proc.stdout + proc.stderr), proc.stderr[-3000:]

  builder = tfds.builder("byol_test_manual", data_dir=str(data_dir))
  assert builder.is_prepared()
  splits = builder.info.splits
  assert {k: splits[k].num_examples for k in splits} == sizes == {
      "train": 300, "validation": 100}
  examples = _decoded(builder.as_dataset(split="validation"))
  labels = np.array([label for _, label in examples])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [10] * 10)
  assert all(image.shape == (224, 224, 3) for image, _ in examples)


def test_ensure_prepared_downloads_like_cifar10(tmp_path, cifar_npz,
                                                monkeypatch, capsys):
  served = tmp_path / "server"
  served.mkdir()
  tfds_builders.write_download_archive(cifar_npz, served, n_train=200,
                                       n_test=100)
  cfg = _data_cfg("byol_test_download", tmp_path / "tfds")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  with tfds_builders.serve(served) as url:
    monkeypatch.setenv(tfds_builders.DOWNLOAD_URL_ENV,
                       f"{url}/{tfds_builders.DOWNLOAD_ARCHIVE}")
    prepare.ensure_prepared(cfg)
  out = capsys.readouterr().out
  where = tmp_path / "tfds"
  assert f"Preparing TFDS dataset byol_test_download in {where}" in out

  builder = tfds.builder("byol_test_download", data_dir=str(tmp_path / "tfds"))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 200, "test": 100}
  # The images are the served JPEGs, decoded.
  npz = np.load(cifar_npz)
  off = npz["test_offsets"]
  want = {f"{i:05d}.jpg": tf.io.decode_jpeg(
      npz["test_jpeg"][off[i]:off[i + 1]].tobytes()).numpy()
          for i in range(100)}
  got = _decoded(builder.as_dataset(split="test"))
  assert sorted(label for _, label in got) == sorted(
      int(x) for x in npz["test_labels"][:100])
  assert all(any(np.array_equal(image, w) for w in want.values())
             for image, _ in got[:5])

  # Prepared: returns at once; the server is gone, so nothing is downloaded.
  prepare.ensure_prepared(cfg)
  assert capsys.readouterr().out == ""


def test_ensure_prepared_offline_is_one_line(tmp_path):
  with pytest.raises(ConfigError) as e:
    prepare.ensure_prepared(_data_cfg("byol_test_offline", tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert "http://127.0.0.1:9/byol_test_offline.tar.gz" in message
  for option in ("--config.data.source=folder", "--config.data.path",
                 "--config.data.data_dir"):
    assert option in message
  assert not list(tmp_path.iterdir())  # found out before writing anything


def test_download_failure_through_a_proxy_is_one_line(tmp_path, monkeypatch):
  """The probe asks the proxy; the proxy answers 404: TFDS's error, one line."""
  (tmp_path / "empty").mkdir()
  for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
    monkeypatch.delenv(name, raising=False)
  with tfds_builders.serve(tmp_path / "empty") as proxy:
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    with pytest.raises(ConfigError) as e:
      prepare.ensure_prepared(_data_cfg("byol_test_offline", tmp_path / "d"))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("Downloading TFDS dataset 'byol_test_offline' "
                            "failed (DownloadError: ")
  assert "404" in message and "--config.data.source=folder" in message


def test_ensure_prepared_manual_dataset_names_the_command(tmp_path):
  with pytest.raises(ConfigError) as e:
    prepare.ensure_prepared(_data_cfg("byol_test_manual", tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert (f"python -m byol_jax.prepare --dataset=byol_test_manual "
          f"--data_dir={tmp_path}") in message
  assert str(tmp_path / "downloads" / "manual") in message
  assert not (tmp_path / "byol_test_manual").exists()
