"""Evaluation: the kNN vote, feature extraction, online and linear accuracy.

Accuracies are checked against NumPy recomputations from PIL-decoded images
(the network's features come from JAX; the counting, voting, padding and
ranking are recomputed independently).
"""
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_jax.core import sharding
from byol_jax.data import augment
from byol_jax.evaluation import knn
from byol_jax.evaluation import linear
from byol_jax.evaluation import monitor
from byol_jax.core.methods import network
from testlib import REPO, assert_error_first, noisy_lines, train_env


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force_scores(train_f, train_y, test_f, num_classes, k, t):
  """The weighted vote, one test row at a time, in float64."""
  sim = test_f.astype(np.float64) @ train_f.astype(np.float64).T  # [M, N]
  scores = np.zeros((len(test_f), num_classes))
  for i in range(len(test_f)):
    for j in np.argsort(-sim[i])[:k]:
      scores[i, train_y[j]] += np.exp(sim[i, j] / t)
  return scores


def _near_ties(train_f, test_f, k, gap=1e-6):
  """Rows whose k-th and (k+1)-th nearest similarities differ by less than
  `gap`: float32 cannot order them (its resolution near 1 is 6e-8), so any
  float32 computation may pick either neighbour."""
  sim = np.sort(test_f.astype(np.float64) @ train_f.astype(np.float64).T, 1)
  if k >= sim.shape[1]:
    return np.zeros(len(test_f), bool)
  return sim[:, -k] - sim[:, -k - 1] < gap


class FakeEval:
  """One pass of padded global batches over arrays, like `data.build_eval`."""

  def __init__(self, images, labels, batch_size, mesh):
    self.images, self.labels = images, labels
    self.batch_size, self.mesh = batch_size, mesh
    self.num_examples = len(images)

  def __iter__(self):
    n, b = self.num_examples, self.batch_size
    for start in range(0, n, b):
      img = self.images[start:start + b]
      lab = self.labels[start:start + b]
      pad = b - len(img)
      mask = np.arange(b) < len(img)
      # Padding rows hold junk that must not reach the result.
      img = np.concatenate([img, np.full((pad,) + img.shape[1:], 7.0,
                                         np.float32)])
      lab = np.concatenate([lab, np.full((pad,), 3, np.int32)])
      yield sharding.global_batch(dict(image=img, label=lab, mask=mask),
                                  self.mesh)


# --------------------------------------------------------------- kNN -------
@pytest.mark.parametrize("k,chunk,use_mesh", [
    (20, 16, False),    # several chunks, the last one padded
    (50, 8, True),      # k larger than a chunk, rows split over 8 devices
    (500, 64, False),   # k larger than the bank: every neighbour votes
])
def test_knn_matches_brute_force(k, chunk, use_mesh):
  rng = np.random.default_rng(k)
  train_f, test_f = _unit(rng, (300, 24)), _unit(rng, (77, 24))
  train_y = rng.integers(0, 7, 300).astype(np.int32)
  mesh = sharding.make_mesh() if use_mesh else None
  scores = knn.knn_scores(train_f, train_y, test_f, 7, k=k, temperature=0.1,
                          chunk=chunk, mesh=mesh)
  expected = _brute_force_scores(train_f, train_y, test_f, 7, k, 0.1)
  assert scores.shape == (77, 7)
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=2e-5,
                             atol=1e-6 * expected.max())
  preds = knn.knn_predict(train_f, train_y, test_f, 7, k=k, temperature=0.1,
                          chunk=chunk, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(preds), expected.argmax(-1))


def test_knn_separable_and_constant_features():
  rng = np.random.default_rng(0)
  num_classes, dim = 10, 32
  centres = _unit(rng, (num_classes, dim)) * 10.0
  train_y = np.repeat(np.arange(num_classes), 30).astype(np.int32)
  test_y = np.repeat(np.arange(num_classes), 10).astype(np.int32)

  def features(y):
    x = centres[y] + rng.normal(size=(len(y), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  preds = knn.knn_predict(features(train_y), train_y, features(test_y),
                          num_classes, k=20)
  assert np.mean(np.asarray(preds) == test_y) == 1.0
  # A collapsed encoder: every similarity ties, votes follow class counts,
  # which are balanced here, so accuracy is chance.
  const = np.ones((len(train_y), dim), np.float32) / np.sqrt(dim)
  preds = knn.knn_predict(const, train_y, const[:len(test_y)], num_classes,
                          k=len(train_y))
  acc = np.mean(np.asarray(preds) == test_y)
  assert acc <= 0.2


def test_topk_accuracy_counts_rank():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  labels = np.array([2, 0, 0])
  acc = knn.topk_accuracy(scores, labels, ks=(1, 2))
  assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


# --------------------------------------------------- extract_features -------
def test_extract_features_drops_padding():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(1)
  n, b = 37, 16  # 3 batches; the last has 11 padding rows
  images = rng.uniform(size=(n, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 5, n).astype(np.int32)
  w = rng.normal(size=(48, 8)).astype(np.float32)
  eval_data = FakeEval(images, labels, b, mesh)
  feats, ys = knn.extract_features(
      lambda v, x: x.reshape(x.shape[0], -1) @ v, eval_data, mesh,
      jnp.asarray(w), normalize=False)
  expected = images.reshape(n, -1) @ w
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  assert feats.shape == (n, 8) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ys, labels)
  assert ys.dtype == np.int32


# ------------------------------------------------ real data, tiny ResNet ----
@pytest.fixture(scope="module")
def cifar_1k(cifar_npz, tmp_path_factory):
  """1,000 train and 500 test images of the real CIFAR subset, re-packed."""
  d = np.load(cifar_npz)
  rng = np.random.default_rng(0)
  out = {"class_names": d["class_names"]}
  for split, n in (("train", 1000), ("test", 500)):
    off, blob = d[f"{split}_offsets"], d[f"{split}_jpeg"]
    sel = np.sort(rng.choice(len(off) - 1, n, replace=False))
    jpegs = [blob[off[i]:off[i + 1]] for i in sel]
    out[f"{split}_jpeg"] = np.concatenate(jpegs)
    out[f"{split}_offsets"] = np.concatenate(
        [[0], np.cumsum([len(j) for j in jpegs])]).astype(np.int64)
    out[f"{split}_labels"] = d[f"{split}_labels"][sel]
  path = tmp_path_factory.mktemp("cifar") / "cifar_1k.npz"
  np.savez(path, **out)
  return path


def _decode_split(path, split):
  """uint8 [N, 32, 32, 3] and labels, decoded with PIL (independently)."""
  d = np.load(path)
  off, blob = d[f"{split}_offsets"], d[f"{split}_jpeg"]
  images = np.stack([
      np.asarray(Image.open(io.BytesIO(
          blob[off[i]:off[i + 1]].tobytes())).convert("RGB"))
      for i in range(len(off) - 1)])
  return images, d[f"{split}_labels"].astype(np.int32)


def _topk_bounds(scores, labels, k, tol):
  """(lowest, highest) top-k accuracy of scores [M, C] if every score could
  move by `tol` (times the row's largest magnitude): the range a float32
  computation of the same numbers can land in. Equal when nothing is near
  a tie.

  The true class's rank is the number of classes scoring strictly higher;
  classes with no kNN vote at all score exactly 0 in any precision, so
  their ties with a true class without votes are never broken.
  """
  scores = np.asarray(scores, np.float64)
  eps = tol * np.abs(scores).max(axis=1, keepdims=True)
  true = np.take_along_axis(scores, labels[:, None], axis=1)
  others = np.ones_like(scores, bool)
  np.put_along_axis(others, labels[:, None], False, axis=1)
  exact_tie = (scores == 0) & (true == 0)
  worst = np.sum(others & ~exact_tie & (scores >= true - eps), axis=1)
  best = np.sum(others & (scores > true + eps), axis=1)
  return float(np.mean(worst < k)), float(np.mean(best < k))


def _assert_accuracy(got, scores, labels, k, tol=1e-5):
  lo, hi = _topk_bounds(scores, labels, k, tol)
  assert lo - 1e-9 <= got <= hi + 1e-9, (k, got, lo, hi)


def _fast_key(seed):
  """An RBG key: compiling a ResNet's init with threefry takes ~20 s on CPU."""
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def tiny_setup(cifar_1k, tiny_config):
  """The tiny config on the 1k pack, its encoder and random-init encoder
  variables."""
  config = tiny_config("byol")
  config.data.path = str(cifar_1k)
  config.data.on_device = True
  # What the trainer's resolve step reads from this data (importing
  # byol_jax.train here would define its absl flags twice, beside the
  # linear_eval CLI's).
  config.data.num_classes = 10
  config.data.eval_split = "test"
  encoder = network.make_encoder(config)
  variables = jax.jit(lambda k: encoder.init(
      k, jnp.zeros((2, 32, 32, 3)), train=False))(_fast_key(0))
  return config, encoder, jax.device_get(variables)


def _features(encoder, variables, images):
  """Pooled representations [N, D] (float64) of uint8 images, one batch."""
  x = augment.normalize(jnp.asarray(images, jnp.float32) / 255.0)
  y = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(variables, x)
  return np.asarray(y, np.float64)


@pytest.fixture(scope="module")
def real_features(tiny_setup, cifar_1k):
  """(train_f [1000, D], train_y, test_f [500, D], test_y): the tiny random
  encoder's float64 representations of the real images, not normalised."""
  _, encoder, variables = tiny_setup
  train_x, train_y = _decode_split(cifar_1k, "train")
  test_x, test_y = _decode_split(cifar_1k, "test")
  return (_features(encoder, variables, train_x), train_y,
          _features(encoder, variables, test_x), test_y)


def _unit64(f):
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


@pytest.mark.parametrize("devices", [1, 8])
def test_sharded_knn_matches_numpy_on_real_features(real_features, devices):
  """The bank split over 1 or 8 devices (997 rows: the shards are uneven and
  padded) gives NumPy's scores, top-1 and top-5."""
  train_f, train_y, test_f, test_y = real_features
  bank_f, bank_y = _unit64(train_f[:997]), train_y[:997]
  mesh = sharding.make_mesh(jax.devices()[:devices])
  scores = np.asarray(knn.knn_scores(
      bank_f.astype(np.float32), bank_y, _unit64(test_f).astype(np.float32),
      10, k=20, temperature=0.1, chunk=64, mesh=mesh))
  expected = _brute_force_scores(bank_f, bank_y, _unit64(test_f), 10, 20, 0.1)
  # The random encoder's features are close together: a few rows have a
  # float32 tie at the k-th neighbour (either neighbour is right).
  ok = ~_near_ties(bank_f, _unit64(test_f), 20)
  assert ok.mean() > 0.97, ok.mean()
  np.testing.assert_allclose(scores[ok], expected[ok], rtol=1e-4,
                             atol=1e-6 * expected.max())
  acc = knn.topk_accuracy(scores[ok], test_y[ok])
  _assert_accuracy(acc["top1"], expected[ok], test_y[ok], 1)
  _assert_accuracy(acc["top5"], expected[ok], test_y[ok], 5)
  assert acc["top1"] > 0.15  # Informative: well above chance (0.1).


def test_monitor_matches_numpy(tiny_setup, real_features, capsys,
                               monkeypatch):
  """Online top-1/5 and kNN top-1/5 of `Monitor` against NumPy on the same
  real images (500 queries in 4 padded batches of 128, a bank of 1,000).

  With a progress period of 0, each pass reports every batch after its
  first, with a rate and an ETA.
  """
  from byol_jax import progress  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(progress, "PERIOD_S", 0.0)
  config, _, variables = tiny_setup
  assert config.data.num_classes == 10 and config.data.eval_split == "test"
  train_f, train_y, test_f, test_y = real_features  # [1000, D], [500, D]
  # A random classifier on centred features: spread-out predictions, so the
  # accuracy is informative.
  kernel = np.random.default_rng(2).normal(size=(test_f.shape[1], 10))
  bias = -test_f.mean(0) @ kernel
  classifier = dict(kernel=jnp.asarray(kernel, jnp.float32),
                    bias=jnp.asarray(bias, jnp.float32))
  result = monitor.Monitor(config, sharding.make_mesh(), batch_size=128)(
      variables, classifier)
  assert set(result) == {"eval/online_top1", "eval/online_top5",
                         "eval/knn_top1", "eval/knn_top5"}
  ticks = [l for l in capsys.readouterr().out.splitlines()
           if " batches (" in l and ", eta " in l]
  assert [l.split(": ")[-1].split()[0] for l in ticks] == [
      "2/4", "3/4", "2/8", "3/8", "4/8", "5/8", "6/8", "7/8"], ticks
  assert ticks[0].startswith("eval on 500 images: 2/4 batches (")
  assert ticks[2].startswith("eval: kNN bank of 1000 images: 2/8 batches (")

  logits = test_f @ kernel + bias  # [500, 10]
  assert len(set(np.argmax(logits, -1))) >= 5
  _assert_accuracy(result["eval/online_top1"], logits, test_y, 1)
  _assert_accuracy(result["eval/online_top5"], logits, test_y, 5)

  scores = _brute_force_scores(_unit64(train_f), train_y, _unit64(test_f),
                               10, config.knn.k, config.knn.temperature)
  # Each float32 tie at the k-th neighbour may move the count by one row.
  ties = np.mean(_near_ties(_unit64(train_f), _unit64(test_f), config.knn.k))
  assert ties < 0.03, ties
  for k in (1, 5):
    lo, hi = _topk_bounds(scores, test_y, k, 1e-5)
    assert lo - ties - 1e-9 <= result[f"eval/knn_top{k}"] <= hi + ties + 1e-9
  # Random-init features still put some neighbours of a class together.
  assert result["eval/knn_top1"] > 0.15


@pytest.mark.parametrize("finetune", [False, True])
def test_linear_evaluator_matches_numpy(tiny_setup, cifar_1k, finetune):
  """The reported top-1/5 are those of the returned head on the returned
  (frozen or fine-tuned) encoder, recomputed in NumPy. Fine-tuning moves the
  encoder and its BN statistics; a linear probe leaves them as they are."""
  config, encoder, variables = tiny_setup
  mesh = sharding.make_mesh()
  result = linear.LinearEvaluator(
      config, encoder, mesh, steps=4, batch_size=64, base_lr=0.1,
      finetune=finetune, eval_batch_size=128)(variables)
  assert result["steps"] == 4 and result["finetune"] == finetune
  assert result["num_eval_examples"] == 500
  tuned = result["variables"] if finetune else variables
  test_x, test_y = _decode_split(cifar_1k, "test")
  head = jax.device_get(result["head"])
  logits = (_features(encoder, tuned, test_x) @ np.asarray(head["kernel"],
                                                           np.float64)
            + np.asarray(head["bias"], np.float64))
  _assert_accuracy(result["top1"], logits, test_y, 1)
  _assert_accuracy(result["top5"], logits, test_y, 5)
  if not finetune:
    return
  assert jax.tree.structure(tuned) == jax.tree.structure(variables)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) -
                                                        np.asarray(b)))),
                       tuned["params"], variables["params"])
  assert max(jax.tree.leaves(moved)) > 0
  # BN running averages moved too (train mode).
  stats_moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                             tuned["batch_stats"], variables["batch_stats"])
  assert any(jax.tree.leaves(stats_moved))


# ------------------------------------------------------------------ CLI -----
def test_cli_linear_eval_of_a_random_checkpoint(tiny_setup, tmp_path):
  """A random-init run through the CLI path: above chance, JSON written."""
  from byol_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  from byol_jax import linear_eval as cli  # pylint: disable=g-import-not-at-top
  config, _, variables = tiny_setup
  data_path = config.data.path
  config = config.copy_and_resolve_references()
  config.data.path = str(tmp_path / "moved_away.npz")  # --data_path fixes it
  # The parts of a train state that evaluation reads.
  state = dict(step=jnp.zeros((), jnp.int32),
               params={"encoder": variables["params"]},
               batch_stats={"encoder": variables["batch_stats"]})
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  ckpt.save(7, state)
  ckpt.close()
  with pytest.raises(cli.ConfigError, match="does not exist"):
    cli.run(str(tmp_path), steps=2, batch_size=64)
  # Batches that do not divide the 8 devices are rounded up, LR following.
  summary = cli.run(str(tmp_path), epochs=8, batch_size=60, base_lr=0.5,
                    eval_batch_size=100, data_path=data_path)
  assert summary["batch_size"] == 64 and summary["eval_batch_size"] == 104
  assert summary["lr"] == pytest.approx(0.5 * 64 / 256)
  written = json.loads((tmp_path / "linear_eval.json").read_text())
  assert summary["output"] == str(tmp_path / "linear_eval.json")
  assert written["checkpoint_step"] == 7 and written["mode"] == "linear"
  assert written["num_train_examples"] == 1000
  assert written["num_eval_examples"] == 500  # not a multiple of 128
  assert written["steps"] == 8 * (1000 // 64) and written["epochs"] == 8
  assert written["device_count"] == 8 and np.isfinite(written["train_loss"])
  # A random encoder's features are linearly separable above chance (10%);
  # measured 0.202 (26 of the 500 test images above the bar). That the
  # reported numbers are the head's accuracy is test_linear_evaluator_*'s.
  assert written["top1"] > 0.15


def test_cli_user_error_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.linear_eval",
       f"--workdir={tmp_path / 'missing'}"],
      capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1],
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert assert_error_first(proc).startswith("error: No checkpoint")


def test_cli_console_is_quiet_and_sums_up_in_one_line(trained_run, tmp_path):
  workdir, _ = trained_run
  out = tmp_path / "linear.json"
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.linear_eval", f"--workdir={workdir}",
       "--steps=2", "--batch_size=16", "--eval_batch_size=200",
       f"--output={out}"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=train_env(2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  assert not noisy_lines(console), console
  assert "Result:" not in console and "{" not in console
  lines = console.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "linear eval of the online encoder at step 16: top-1 "), console
  assert json.loads(out.read_text())["steps"] == 2


def test_finetune_1pct_preset_fits_the_labels_and_shows_progress(
    trained_run, tmp_path, capsys, monkeypatch):
  """The 1% preset (batch 4096) on 50 labelled images, BYOL's EMA encoder.

  Each step is slowed beyond the progress period, so that every step after
  the first prints a progress line, whatever the machine's load.
  """
  from byol_jax import linear_eval as cli  # pylint: disable=g-import-not-at-top
  from byol_jax import progress  # pylint: disable=g-import-not-at-top
  workdir, _ = trained_run
  monkeypatch.setattr(progress, "PERIOD_S", 0.05)
  build = linear.data.build_linear_train

  class Slow:
    def __init__(self, batches):
      self._batches = batches

    def __getattr__(self, name):
      return getattr(self._batches, name)

    def batch(self, step):
      time.sleep(0.1)
      return self._batches.batch(step)

  monkeypatch.setattr(linear.data, "build_linear_train",
                      lambda *a, **k: Slow(build(*a, **k)))
  out = tmp_path / "finetune.json"
  summary = cli.run(str(workdir), preset="finetune_1pct", which="target",
                    steps=4, eval_batch_size=200, output=str(out))
  console = capsys.readouterr().out
  written = json.loads(out.read_text())
  assert written["which"] == "target" and written["mode"] == "finetune"
  assert written["fraction"] == 0.01
  assert written["num_train_examples"] == 50  # 5 of each of 10 classes.
  # Fitted to the labels: 48 (a multiple of the 8 devices), said once.
  assert written["batch_size"] == 48
  assert console.count("batch 48 instead of 4096, the 50 labelled images") == 1
  assert written["num_eval_examples"] == 1000 and written["steps"] == 4
  assert np.isfinite(written["train_loss"]) and written["top1"] >= 0.0
  assert summary["dataset"].endswith("cifar10_small.npz")
  ticks = [l for l in console.splitlines() if l.startswith("fine-tuning: ")]
  assert [l.split()[1] for l in ticks] == ["2/4", "3/4"], console
  assert all(" steps/s, eta " in l and " loss " in l for l in ticks), ticks
  with pytest.raises(cli.ConfigError, match="fraction"):
    cli.run(str(workdir), mode="finetune", fraction=1.5, steps=1)


def test_batches_fit_the_labelled_data():
  """Train batches round down to the devices, eval batches up; never 0."""
  assert linear.fit_to_data(4096, 4096, 50, 30, 8) == (48, 32)
  assert linear.fit_to_data(64, 200, 1000, 1000, 8) == (64, 200)
  assert linear.fit_to_data(64, 64, 5, 3, 8) == (8, 8)
