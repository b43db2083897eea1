"""Properties of the methods' loss functions, as the train step calls them.

`loss_fn(model, params, batch_stats, target, view1, view2)` is run with the
real network wrapped in `Recording`, which logs what each `model.apply` call
saw and returned, so the view-1 outputs (the online ones returned in `out1`,
and the target's projection of view 1) can be compared between two batches
that differ only in view 2.
"""
import functools
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from byol_jax.core import methods
from byol_jax.core import sharding
from byol_jax.core import step as step_lib
from byol_jax.core import train_state
from byol_jax.data import augment


class Recording:
  """The network, with a log of every `apply`: (method name, input, output).

  Everything else is the network's own (attribute access is delegated).
  """

  def __init__(self, model):
    self._model = model
    self.calls = []

  def __getattr__(self, name):
    return getattr(self._model, name)

  def apply(self, variables, x, **kwargs):
    result = self._model.apply(variables, x, **kwargs)
    method = kwargs.get("method") or "__call__"
    name = getattr(method, "__name__", method)
    self.calls.append((name, x, result[0] if kwargs.get("mutable") else result))
    return result


def real_views(cifar_npz, n=16):
  """view1 and two different view2s: normalised real CIFAR images."""
  with np.load(cifar_npz) as d:
    off, blob = d["train_offsets"], d["train_jpeg"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(
        blob[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                       for i in range(3 * n)])
  x = augment.normalize(jnp.asarray(images, jnp.float32) / 255.0)
  return x[:n], x[n:2 * n], x[2 * n:]


def init(config):
  """The method, its network and an initial train state (one device)."""
  method = methods.get(config.method)
  model = method.make_network(config)
  state = train_state.create(config, model, optax.sgd(0.1),
                             sharding.make_mesh(jax.devices()[:1]),
                             method.HAS_TARGET)
  return method, model, jax.device_get(state)


def assert_trees_differ(a, b, min_rel=1e-3):
  """Some leaf of a differs from b by more than min_rel of b's scale."""
  rel = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()
                  / (np.abs(np.asarray(y)).max() + 1e-12))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert rel > min_rel, rel


# ------------------------------------------------------------------ BYOL ----
@pytest.fixture(scope="module")
def byol_runs(tiny_config, cifar_npz):
  """BYOL's loss_fn on (view1, view2a) and (view1, view2b), with the
  gradient of the step's classifier term (same labels both times)."""
  config = tiny_config("byol")
  method, model, state = init(config)
  loss_fn = functools.partial(method.loss_fn, config)
  view1, view2a, view2b = real_views(cifar_npz)
  labels = jnp.arange(view1.shape[0], dtype=jnp.int32) % 10

  @jax.jit
  def run(params, batch_stats, target, view1, view2):
    def classifier_loss(params):
      rec = Recording(model)
      loss, (out1, bs, tbs, _) = loss_fn(rec, params, batch_stats, target,
                                         view1, view2)
      target1 = [out for name, x, out in rec.calls
                 if name == "project" and x is view1]
      cls_loss, _ = step_lib.classifier_metrics(out1["logits"], labels)
      return cls_loss, (loss, out1, target1, bs, tbs)
    return jax.grad(classifier_loss, has_aux=True)(params)

  args = (state.params, state.batch_stats, state.target)
  return types.SimpleNamespace(
      model=model, state=state, view1=view1,
      a=jax.device_get(run(*args, view1, view2a)),
      b=jax.device_get(run(*args, view1, view2b)))


def test_byol_view1_outputs_do_not_see_view2(byol_runs):
  """BN statistics per view: changing view 2 leaves every view-1 output of
  the online and the target network bit-identical."""
  (_, (loss_a, out_a, tgt_a, _, _)), (_, (loss_b, out_b, tgt_b, _, _)) = (
      byol_runs.a, byol_runs.b)
  assert len(tgt_a) == 1, (
      f"{len(tgt_a)} target applies saw view 1 on its own (expected 1)")
  for key in ("repr", "proj", "pred", "logits"):
    np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)
  for key in ("repr", "proj"):
    np.testing.assert_array_equal(tgt_a[0][key], tgt_b[0][key], err_msg=key)
  assert abs(float(loss_a) - float(loss_b)) > 1e-3  # view 2 does count


def test_byol_target_projects_with_batch_statistics(byol_runs):
  """The target runs in training mode: its projection of view 1 is the
  batch-statistics one, not the moving-average one."""
  model, target = byol_runs.model, byol_runs.state.target
  used = byol_runs.a[1][2][0]["proj"]

  @jax.jit
  def project(target, x):
    train, _ = model.apply(target, x, train=True, method=model.project,
                           mutable=["batch_stats"])
    infer = model.apply(target, x, train=False, method=model.project)
    return train["proj"], infer["proj"]

  train, infer = jax.device_get(project(target, byol_runs.view1))
  np.testing.assert_allclose(used, train, rtol=1e-5, atol=1e-6)
  assert_trees_differ(infer, used, min_rel=0.1)


def test_byol_target_keeps_its_own_statistics(byol_runs):
  """loss_fn returns new target BN statistics, moved from the target's
  initial ones and unlike the online network's."""
  state, (_, (_, _, _, bs, tbs)) = byol_runs.state, byol_runs.a
  assert_trees_differ(tbs, state.target["batch_stats"])
  assert_trees_differ(tbs["encoder"], bs["encoder"])
  assert_trees_differ(tbs["projector"], bs["projector"])


def test_classifier_loss_gradient_reaches_only_the_classifier(byol_runs):
  grads = byol_runs.a[0]
  for part in ("encoder", "projector", "predictor"):
    for leaf in jax.tree.leaves(grads[part]):
      assert np.all(leaf == 0.0), part  # exactly, not approximately
  for leaf in jax.tree.leaves(grads["classifier"]):
    assert np.abs(leaf).max() > 0


# ------------------------------------------------------ SimSiam, SimCLR ----
@pytest.mark.parametrize("name,per_view", [("simsiam", True),
                                           ("simclr", False)])
def test_view1_outputs_and_view2(tiny_config, cifar_npz, name, per_view):
  """SimSiam normalises each view on its own: view-1 outputs ignore view 2.
  SimCLR puts both views in one BN batch: they change with it."""
  config = tiny_config(name)
  method, model, state = init(config)
  loss_fn = functools.partial(method.loss_fn, config)
  view1, view2a, view2b = real_views(cifar_npz)

  @jax.jit
  def run(params, batch_stats, view1, view2):
    loss, (out1, _, _, _) = loss_fn(model, params, batch_stats, None, view1,
                                    view2)
    return loss, out1

  (loss_a, out_a), (loss_b, out_b) = (
      jax.device_get(run(state.params, state.batch_stats, view1, v2))
      for v2 in (view2a, view2b))
  assert abs(float(loss_a) - float(loss_b)) > 1e-4
  for key in ("repr", "proj", "pred"):
    if per_view:
      np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)
    else:
      assert_trees_differ(out_a[key], out_b[key])
