"""Evaluation: the kNN vote, feature extraction, online and linear accuracy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import sharding
from byol_jax.evaluation import knn


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
