"""The first hour of a new user (issue 14): data that just loads, through the
train command itself."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

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


def _folder_config(tiny_config, root, **overrides):
  c = tiny_config(total_steps=2, log_every_steps=1, checkpoint_every_steps=0,
                  knn__enabled=False, **overrides)
  c.data.update(dict(source="folder", path=str(root), num_classes=-1,
                     eval_split="", train_split="train", on_device=False))
  return c


def test_folder_with_train_and_val_trains_and_evaluates(
    nette_folder, tiny_config, tmp_path, capsys):
  final = train.train_and_evaluate(_folder_config(tiny_config, nette_folder),
                                   str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert final["step"] == 2 and "eval/online_top1" in final
  assert str(nette_folder) in out.splitlines()[0]  # Named by its path.
  saved = (tmp_path / "run" / "config.json").read_text()
  assert '"num_classes": 10' in saved and '"eval_split": "val"' in saved


def test_unlabelled_folder_trains_with_the_same_command(
    nette_folder, tiny_config, tmp_path, capsys):
  root = tmp_path / "unlabelled"
  (root / "train").mkdir(parents=True)
  for p in sorted((nette_folder / "train").rglob("*.JPEG"))[:64]:
    shutil.copy(p, root / "train" / p.name)
  final = train.train_and_evaluate(_folder_config(tiny_config, root),
                                   str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert final["step"] == 2 and not any(k.startswith("eval/") for k in final)
  assert out.count("has no labels") == 1
  assert checkpoint_steps(tmp_path / "run") == [2]


def test_classes_that_disagree_with_the_folder_are_one_line(
    nette_folder, tiny_config, tmp_path):
  config = _folder_config(tiny_config, nette_folder)
  config.data.num_classes = 5
  with pytest.raises(ConfigError, match="num_classes") as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
