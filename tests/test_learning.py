"""Pretraining learns: representations beat the same network at its start.

The default suite keeps one learning test (SimCLR, whose margin at CPU scale
is largest): 100 steps of configs/tiny.py on real CIFAR-10 images, then a
linear head fitted in closed form (ridge regression on standardised features
of centre crops, six-fold cross-validated over the 6,000 labelled images),
against the same probe of the network at the initialisation the run started
from. The margin must exceed three standard errors of the difference.

`pytest -m slow tests/test_learning.py` runs the longer evidence: the linear
evaluation protocol (10 epochs through the frozen encoder) for each method.
"""
import json

import jax
import numpy as np
import pytest

from byol_jax import data
from byol_jax.core import methods
from byol_jax.core import optim
from byol_jax.interop import pretrained
from byol_jax.core import sharding
from byol_jax.core import train_state
from byol_jax.evaluation import knn
from byol_jax.core.methods import network

# The linear protocol's runs (slow); the default test's SimCLR run is shorter.
STEPS = {"byol": 300, "simclr": 300, "simsiam": 1000}
DEFAULT_STEPS = 100


def _pretrain(tmp_path_factory, run_train, method, devices=2, steps=None):
  workdir = tmp_path_factory.mktemp(f"learn_{method}") / "run"
  run_train(workdir, f"method={method},steps={steps or STEPS[method]}",
            "--config.checkpoint_every_steps=100000",
            "--config.log_every_steps=10", "--config.knn.enabled=False",
            timeout=1800, devices=devices, narrow=False, optimize=True)
  return workdir


def _init_variables(config, method):
  """The encoder at the initialisation the run started from (same seed)."""
  method_lib = methods.get(method)
  model = method_lib.make_network(config)
  tx, _ = optim.build_optimizer(config, 10, 1)
  state = train_state.create(config, model, tx, sharding.make_mesh(),
                             method_lib.HAS_TARGET)
  return {"params": state.params["encoder"],
          "batch_stats": state.batch_stats["encoder"]}


def _ridge_correct(config, variables, folds: int = 6) -> np.ndarray:
  """Per image: does a ridge-regression head on the features get it right?

  Six-fold cross-validation over all 6,000 labelled images (the 5,000 the
  run pretrained on without labels and the 1,000 test images): every image
  is scored by a head fitted on the other five sixths, which gives six times
  the examples of the test split alone and a standard error sqrt(6) smaller.
  """
  mesh = sharding.make_mesh()
  encoder = network.make_encoder(config)
  apply = lambda v, x: encoder.apply(v, x, train=False)  # noqa: E731
  parts = [knn.extract_features(
      apply, data.build_eval(config, mesh, split, 200), mesh, variables)
           for split in (config.data.train_split, config.data.eval_split)]
  x = np.concatenate([p[0] for p in parts])              # [6000, D]
  y = np.concatenate([p[1] for p in parts])              # [6000]
  fold = np.arange(len(x)) % folds
  correct = np.zeros(len(x), bool)
  for k in range(folds):
    train, test = fold != k, fold == k
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    xtr, xte = [np.c_[(v - mu) / sd, np.ones(len(v))]
                for v in (x[train], x[test])]
    targets = 2.0 * np.eye(config.data.num_classes)[y[train]] - 1.0
    w = np.linalg.solve(xtr.T @ xtr + 0.01 * len(xtr) * np.eye(xtr.shape[1]),
                        xtr.T @ targets)
    correct[test] = np.argmax(xte @ w, axis=1) == y[test]
  return correct


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory, run_train):
  # One device: no collectives to wait on, and the quickest on 2 cores.
  return _pretrain(tmp_path_factory, run_train, "simclr", devices=1,
                   steps=DEFAULT_STEPS)


def _check_learned(workdir, method, steps=None):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines() if '"loss"' in l]
  loss = np.array([r["loss"] for r in rows])
  std = np.array([r["embedding_std"] for r in rows])
  config, state, step = pretrained.load_run(str(workdir))
  assert step == (steps or STEPS[method])
  # It learned without collapsing (the std of the normalised projections is
  # about 1/sqrt(dim) when they spread over the sphere, 0 when collapsed).
  assert np.isfinite(loss).all()
  assert loss[-3:].mean() < loss[:3].mean() - 0.2, loss
  assert std[-3:].mean() > 0.25 / np.sqrt(config.projector.output_dim), std
  return config, pretrained.encoder_variables(state, "online")


def test_simclr_beats_its_initialisation_by_three_standard_errors(simclr_run):
  config, trained = _check_learned(simclr_run, "simclr", DEFAULT_STEPS)
  learned = _ridge_correct(config, trained)
  baseline = _ridge_correct(config, jax.device_get(
      _init_variables(config, "simclr")))
  n = len(learned)
  assert n == 6000
  p1, p0 = learned.mean(), baseline.mean()
  se = np.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / n)
  print(f"simclr ridge probe: {p1:.3f} after {DEFAULT_STEPS} steps vs "
        f"{p0:.3f} at initialisation ({(p1 - p0) / se:.1f} standard errors)")
  assert p0 > 0.15
  assert p1 - p0 > 3 * se, (p1, p0, se)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_linear_protocol_beats_a_random_encoder(tmp_path_factory, run_train,
                                                method):
  """The 10-epoch linear protocol on the pretrained and the initial encoder."""
  from byol_jax.evaluation import linear  # pylint: disable=g-import-not-at-top
  workdir = _pretrain(tmp_path_factory, run_train, method)
  config, trained = _check_learned(workdir, method)
  evaluate = linear.LinearEvaluator(
      config, network.make_encoder(config), sharding.make_mesh(), epochs=10,
      batch_size=64, eval_batch_size=200)
  learned = evaluate(trained)["top1"]
  baseline = evaluate(_init_variables(config, method))["top1"]
  print(f"{method}: linear top-1 {learned:.3f} after {STEPS[method]} steps "
        f"vs {baseline:.3f} at initialisation")
  assert 0.15 < baseline
  assert learned > baseline + 0.015, (learned, baseline)
