"""Evaluation: the kNN vote, feature extraction, online and linear accuracy."""
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_jax import sharding
from byol_jax.evaluation import knn
from byol_jax.evaluation import linear
from byol_jax.evaluation import online


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
@pytest.mark.parametrize("explicit_variables", [False, True])
def test_extract_features_drops_padding(explicit_variables):
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(1)
  n, b = 37, 16  # 3 batches; the last has 11 padding rows
  images = rng.uniform(size=(n, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 5, n).astype(np.int32)
  w = rng.normal(size=(48, 8)).astype(np.float32)
  eval_data = FakeEval(images, labels, b, mesh)
  if explicit_variables:
    feats, ys = knn.extract_features(
        lambda v, x: x.reshape(x.shape[0], -1) @ v, eval_data, mesh,
        jnp.asarray(w), normalize=False)
  else:
    feats, ys = knn.extract_features(
        lambda x: x.reshape(x.shape[0], -1) @ w, eval_data, mesh,
        normalize=False)
  expected = images.reshape(n, -1) @ w
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  assert feats.shape == (n, 8) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ys, labels)
  assert ys.dtype == np.int32


# ------------------------------------------------ real data, tiny ResNet ----
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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


def _fast_key(seed):
  """An RBG key: compiling a ResNet's init with threefry takes ~20 s on CPU."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _tiny(path):
  config = _load_config("tiny")
  config.data.path = str(path)
  config.data.on_device = True
  return config


@pytest.fixture(scope="module")
def tiny_encoder(cifar_1k):
  from byol_jax.methods import network  # pylint: disable=g-import-not-at-top
  config = _tiny(cifar_1k)
  encoder = network.make_encoder(config)
  variables = jax.jit(lambda k: encoder.init(
      k, jnp.zeros((2, 32, 32, 3)), train=False))(_fast_key(0))
  return config, encoder, variables


def test_knn_accuracy_on_real_images(tiny_encoder):
  config, encoder, variables = tiny_encoder
  mesh = sharding.make_mesh()
  result = knn.knn_accuracy(
      config, lambda v, x: encoder.apply(v, x, train=False), mesh, variables,
      batch_size=128)
  assert result["num_train"] == 1000 and result["num_test"] == 500
  # Even random-init features put neighbours of a class together somewhat.
  assert 0.15 < result["top1"] <= result["top5"] <= 1.0


def test_finetune_trains_the_encoder(tiny_encoder):
  config, encoder, variables = tiny_encoder
  mesh = sharding.make_mesh()
  result = linear.linear_eval(config, encoder, variables, mesh, steps=4,
                              batch_size=64, base_lr=0.1, finetune=True,
                              eval_batch_size=128)
  assert result["steps"] == 4 and result["finetune"]
  assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
  tuned = result["variables"]
  assert jax.tree.structure(tuned) == jax.tree.structure(variables)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) -
                                                        np.asarray(b)))),
                       tuned["params"], variables["params"])
  assert max(jax.tree.leaves(moved)) > 0
  # BN running averages moved too (train mode).
  stats_moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                             tuned["batch_stats"], variables["batch_stats"])
  assert any(jax.tree.leaves(stats_moved))
  # The caller's variables survive the donated fine-tuning state.
  jax.tree.map(np.asarray, variables)


def test_classifier_accuracy_matches_numpy(cifar_1k):
  from byol_jax import methods  # pylint: disable=g-import-not-at-top
  from byol_jax.data import augment  # pylint: disable=g-import-not-at-top
  config = _tiny(cifar_1k)
  model = methods.get(config.method).make_network(config)
  mesh = sharding.make_mesh()
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((2, 32, 32, 3)), train=False))(_fast_key(1))
  variables = jax.tree.map(lambda x: x, variables)  # a plain dict copy
  images, labels = _decode_split(cifar_1k, "test")
  x = augment.normalize(jnp.asarray(images, jnp.float32) / 255.0)
  feats = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, x)["repr"], np.float64)  # [500, D]
  # A random classifier on centred features: spread-out predictions, so the
  # accuracy is informative.
  kernel = np.random.default_rng(2).normal(
      size=variables["params"]["classifier"]["kernel"].shape)
  bias = -feats.mean(0) @ kernel
  variables["params"]["classifier"] = dict(kernel=jnp.asarray(kernel),
                                           bias=jnp.asarray(bias))
  result = online.classifier_accuracy(config, model, variables, mesh,
                                      batch_size=64)  # 500 = 7 * 64 + 52
  logits = feats @ kernel + bias  # [500, 10], in NumPy
  ranks = np.sum(logits > np.take_along_axis(logits, labels[:, None], 1), 1)
  assert result["num_examples"] == 500
  # Identical up to the odd near-tie between two JPEG decoders.
  assert abs(result["top1"] - np.mean(ranks == 0)) <= 2 / 500
  assert abs(result["top5"] - np.mean(ranks < 5)) <= 2 / 500
  assert len(set(np.argmax(logits, -1))) >= 5


# ------------------------------------------------------------------ CLI -----
def test_cli_linear_eval_of_a_random_checkpoint(tiny_encoder, tmp_path):
  """A random-init run through the CLI path: above chance, JSON written."""
  from byol_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from byol_jax import linear_eval as cli  # pylint: disable=g-import-not-at-top
  config, _, variables = tiny_encoder
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
  with pytest.raises(cli.ConfigError, match="multiple of the 8 devices"):
    cli.run(str(tmp_path), steps=2, batch_size=12)
  summary = cli.run(str(tmp_path), epochs=8, batch_size=64, base_lr=0.5,
                    eval_batch_size=128, data_path=data_path)
  written = json.loads((tmp_path / "linear_eval.json").read_text())
  assert summary["output"] == str(tmp_path / "linear_eval.json")
  assert written["checkpoint_step"] == 7 and written["mode"] == "linear"
  assert written["num_train_examples"] == 1000
  assert written["num_eval_examples"] == 500  # not a multiple of 128
  assert written["steps"] == 8 * (1000 // 64) and written["epochs"] == 8
  assert written["device_count"] == 8 and np.isfinite(written["train_loss"])
  # A random encoder's features are linearly separable above chance (10%).
  assert 0.15 < written["top1"] <= written["top5"] <= 1.0


def test_cli_user_error_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax.linear_eval",
       f"--workdir={tmp_path / 'missing'}"],
      capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1],
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: No checkpoint")
