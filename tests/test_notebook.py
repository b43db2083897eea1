"""launch/colab_tpu.ipynb: its structure, and a headless CPU run with tiny.py."""
import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tpu.ipynb"


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb):
  code = [c for c in nb.cells if c.cell_type == "code"]
  tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
  assert tagged[0] is code[0], "the parameters cell is the first code cell"
  return tagged[0]


def test_notebook_is_valid_and_parameterised():
  nb = _read()
  nbformat.validate(nb)
  source = _parameters_cell(nb).source
  for name in ["REPO_URL", "CONFIG", "CONFIG_ARG", "WORKDIR", "STEPS",
               "OVERRIDES", "LINEAR_EVAL_STEPS", "NUM_EMBED"]:
    assert f"\n{name} = " in "\n" + source, name
  assert "<-- SET THIS" in source  # The repository URL is clearly marked.
  # Outputs are not committed.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_install_is_skipped_when_importable():
  text = "\n".join(c.source for c in _read().cells if c.cell_type == "code")
  assert 'find_spec("byol_jax") is None' in text
  assert "byol_jax[tf] @ git+" in text
  # If installing byol_jax changes jax, the accelerator runtime of that same
  # version follows (libtpu must match jax).
  assert 'pip_install(f"jax[{extra}]=={jax_after}")' in text


def test_notebook_runs_headless_on_cpu(tmp_path, cifar_npz, monkeypatch):
  """Executes every cell with configs/tiny.py on the local CIFAR-10 subset."""
  workdir = tmp_path / "run"
  nb = _read()
  _parameters_cell(nb).source = "\n".join([
      f"REPO_URL = {'https://example.invalid/byol_jax'!r}",
      "REPO_REF = 'main'",
      f"REPO_DIR = {str(REPO)!r}",
      f"CONFIG = {str(REPO / 'configs' / 'tiny.py')!r}",
      f"CONFIG_ARG = {f'path={cifar_npz},batch=16'!r}",
      f"WORKDIR = {str(workdir)!r}",
      "STEPS = 6",  # As the 6-step runs of test_run_safety.py: one program.
      # As small as tests/test_train.py's runs: 2-core CI machines.
      "OVERRIDES = {'model.num_filters': 4, 'projector.hidden_dim': 32,",
      "             'predictor.hidden_dim': 32, 'knn.k': 10,",
      "             'log_every_steps': 2, 'eval_every_steps': 0}",
      "LINEAR_EVAL_STEPS = 2",
      "LINEAR_EVAL_BATCH = 16",
      "NUM_EMBED = 4",
  ])
  monkeypatch.setenv("MPLBACKEND", "Agg")  # If matplotlib is installed.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONUNBUFFERED", "1")
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(REPO)}})
  client.execute()  # Raises CellExecutionError with the failing cell.

  # The cells' stdout in order. The kernel may split one print into several
  # stream outputs anywhere: joined without separators they are exactly the
  # printed text, however they were chunked.
  outputs = "".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code"
      for o in c.outputs
      if o.get("output_type") == "stream" and o.get("name") == "stdout")
  assert "8 CPU device(s)" in outputs, outputs  # What the notebook found.
  assert "finished at step 6" in outputs, outputs
  assert "loss: 2: " in outputs and "kNN top-1 %: 6: " in outputs, outputs
  assert "linear evaluation after 2 steps" in outputs, outputs
  assert "embeddings: (4, " in outputs, outputs
  assert outputs.count("nearest is image") == 4, outputs

  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
  assert any("eval/knn_top1" in r for r in rows)
  assert (workdir / "checkpoints" / "6").is_dir()
  assert os.path.isfile(workdir / "config.json")
