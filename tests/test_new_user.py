"""The first hour of a new user (issue 14): data that just loads, through the
train command itself."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from byol_jax import train
from byol_jax.errors import ConfigError
from testlib import CONFIGS, REPO, checkpoint_steps, error_lines, load_config
from testlib import train_env

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


def _readme_folder_command(root) -> list[str]:
  """The README's command for a folder of one's own, pointed at `root`."""
  line = next(l for l in (REPO / "README.md").read_text().splitlines()
              if l.startswith("python -m byol_jax.train") and
              "source=folder,path=/data/imagewoof2-320" in l)
  return line.replace("/data/imagewoof2-320", str(root)).split()


@pytest.fixture(scope="module")
def woof3(nette_folder, tmp_path_factory):
  """ROOT/{train,val}/<3 classes>/*.JPEG: real images, not 10 classes."""
  root = tmp_path_factory.mktemp("new_user") / "woof3"
  for split in ("train", "val"):
    for cls in sorted(p.name for p in (nette_folder / split).iterdir())[:3]:
      shutil.copytree(nette_folder / split / cls, root / split / cls)
  return root


def test_readme_folder_command_on_a_3_class_train_val_folder(woof3,
                                                             tmp_path):
  """As written in the README (the tiny preset pins CIFAR-10's 'test' split
  and 10 classes no longer), narrowed to 2 steps."""
  argv = _readme_folder_command(woof3)
  workdir = tmp_path / "run"
  argv = [sys.executable] + [a if not a.startswith("--workdir=")
                             else f"--workdir={workdir}" for a in argv[1:]]
  proc = subprocess.run(
      argv + ["--config.total_steps=2", "--config.batch_size=16",
              "--config.model.num_filters=4", "--config.knn.k=10",
              "--config.projector.hidden_dim=32",
              "--config.predictor.hidden_dim=32"],
      cwd=REPO, env=train_env(8), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  out = proc.stdout
  assert str(woof3) in out.splitlines()[0]  # The start-up line names it.
  assert "online_top1" in out and "knn_top1" in out  # Evaluated on val.
  assert "has a single class" not in out
  saved = json.loads((workdir / "config.json").read_text())["data"]
  assert (saved["name"], saved["num_classes"], saved["eval_split"]) == (
      "woof3", 3, "val")
  assert checkpoint_steps(workdir) == [2]


def test_unlabelled_folder_trains_with_the_same_command(
    nette_folder, tiny_config, tmp_path, capsys):
  """The README command's config on a folder without class subfolders."""
  root = tmp_path / "unlabelled"
  (root / "train").mkdir(parents=True)
  for p in sorted((nette_folder / "train").rglob("*.JPEG"))[:64]:
    shutil.copy(p, root / "train" / p.name)
  arg = _readme_folder_command(root)[3].split(":", 1)[1]
  config = load_config("tiny", arg)
  narrow = tiny_config(total_steps=2, log_every_steps=1,
                       checkpoint_every_steps=0)
  for key in ("batch_size", "total_steps", "log_every_steps",
              "checkpoint_every_steps"):
    config[key] = narrow[key]
  for key in ("model", "projector", "predictor"):
    config[key] = narrow[key]
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert final["step"] == 2 and not any(k.startswith("eval/") for k in final)
  assert out.count("has no labels") == 1
  assert checkpoint_steps(tmp_path / "run") == [2]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
  assert (saved["name"], saved["num_classes"]) == ("unlabelled", 0)


def test_classes_that_disagree_with_the_folder_are_one_line(
    nette_folder, tiny_config, tmp_path):
  config = _folder_config(tiny_config, nette_folder)
  config.data.num_classes = 5
  with pytest.raises(ConfigError, match="num_classes") as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


def test_single_class_folder_is_a_warning_at_start_up(woof3, tiny_config,
                                                      tmp_path, capsys):
  """Every accuracy on one class is 100%: said before anything compiles
  (the run then stops at a workdir that is a file, before compiling)."""
  root = tmp_path / "one_class"
  for split in ("train", "val"):
    cls = sorted(p.name for p in (woof3 / split).iterdir())[0]
    shutil.copytree(woof3 / split / cls, root / split / cls)
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(ConfigError):
    train.train_and_evaluate(_folder_config(tiny_config, root),
                             str(not_a_dir))
  out = capsys.readouterr().out
  assert out.count("has a single class") == 1, out


def test_a_network_from_an_unresolved_config_says_how_to_resolve_it():
  """-1 classes mean 'from the data': a library user is told to resolve."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.core import methods  # pylint: disable=g-import-not-at-top
  config = load_config("tiny", "source=folder,path=/data/imagewoof2-320")
  assert config.data.num_classes == -1 and config.data.eval_split == ""
  model = methods.get("byol").make_network(config)
  with pytest.raises(ConfigError, match="byol_jax.data.resolve"):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      np.zeros((1, 32, 32, 3), np.float32)))
