"""The first hour of a new user (issue 14): data that just loads, through the
train command itself."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from byol_jax import train
from byol_jax.errors import ConfigError
from testlib import CONFIGS, REPO, checkpoint_steps, error_lines, train_env

TESTS = pathlib.Path(__file__).resolve().parent
tfds_builders = pytest.importorskip("tfds_builders")  # Needs TFDS.


def _tfds_config(tmp_path, name: str) -> pathlib.Path:
  """A config file that registers the test builders, as a user's would."""
  path = tmp_path / "tfds_config.py"
  path.write_text(textwrap.dedent(f"""
      import importlib.util, sys
      sys.path.insert(0, {str(TESTS)!r})
      import tfds_builders  # Registers the builders with TFDS.

      def get_config(arg=None):
        spec = importlib.util.spec_from_file_location(
            "tiny", {str(CONFIGS / 'tiny.py')!r})
        tiny = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
        c = tiny.get_config("batch=16,steps=4")
        c.data.source = "tfds"
        c.data.name = {name!r}
        c.data.data_dir = {str(tmp_path / 'tfds')!r}
        c.data.num_classes = -1
        c.data.eval_split = ""
        c.model.num_filters = 4
        c.projector.hidden_dim = c.predictor.hidden_dim = 32
        c.knn.k = 10
        return c
  """))
  return path


def test_train_command_downloads_and_prepares_tfds_data(tmp_path, cifar_npz):
  served = tmp_path / "served"
  served.mkdir()
  tfds_builders.write_download_archive(cifar_npz, served)
  config = _tfds_config(tmp_path, "byol_test_download")
  with tfds_builders.serve(served) as url:
    env = dict(train_env(8), **{tfds_builders.DOWNLOAD_URL_ENV:
                                f"{url}/{tfds_builders.DOWNLOAD_ARCHIVE}"})
    proc = subprocess.run(
        [sys.executable, "-m", "byol_jax.train", f"--config={config}",
         f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "tfds" / "byol_test_download").is_dir()
  assert checkpoint_steps(tmp_path / "run") == [4]
  assert "byol_test_download" in proc.stdout  # The records name the data.
  assert "online_top1" in proc.stdout  # Labels and eval split were found.


def test_offline_download_is_one_line(tmp_path):
  config = _tfds_config(tmp_path, "byol_test_offline")
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.train", f"--config={config}",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=train_env(8),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = error_lines(proc.stderr)
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "source=folder" in errors[0] and "data_dir" in errors[0]


def test_without_test_data_the_data_tests_skip_with_one_line(tmp_path):
  """No packs, no ../shared and no network: skipped, saying how to fix it."""
  env = dict(os.environ, BYOL_JAX_TEST_DATA=str(tmp_path / "empty"),
             BYOL_SHARED=str(tmp_path / "no_shared"),
             http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
             HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
             TFDS_DATA_DIR=str(tmp_path / "tfds"))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly",
       "tests/test_train.py::test_a_run_writes_what_it_promises"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "1 skipped" in proc.stdout
  skips = [l for l in proc.stdout.splitlines() if l.startswith("SKIPPED")]
  assert len(skips) == 1 and "BYOL_JAX_TEST_DATA" in skips[0], proc.stdout
