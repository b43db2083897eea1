"""The sharded train step: 1 vs 8 devices, compiled once, donation, state."""
import importlib.util
import pathlib

import chex
import jax
import ml_collections
import numpy as np
import pytest

from byol_jax import data
from byol_jax import methods
from byol_jax import optim
from byol_jax import sharding
from byol_jax import step as step_lib
from byol_jax import train_state

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(cifar_npz, method="byol", batch=16, **overrides):
  c = load_config("tiny", f"method={method},batch={batch}")
  c.data.path = str(cifar_npz)
  c.model.num_filters = 4
  c.projector.hidden_dim = 32
  c.predictor.hidden_dim = 32 if method != "simsiam" else 8
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def real_batch(cifar_npz, n, seed=0):
  images, labels = data.load_arrays(ml_collections.ConfigDict(
      dict(source="npz", path=str(cifar_npz), image_size=32)), "train")
  idx = np.random.default_rng(seed).choice(len(images), n, replace=False)
  return dict(view1=images[idx], view2=images[idx[::-1]].copy(),
              label=labels[idx].astype(np.int32))


def assert_close_to_scale(a, b, rtol=1e-3, atol=1e-5):
  """Each leaf of a equals b within rtol of b's largest magnitude."""
  chex.assert_trees_all_equal_shapes(a, b)
  for path, x, y in zip(jax.tree_util.tree_leaves_with_path(a),
                        jax.tree.leaves(a), jax.tree.leaves(b)):
    err = float(np.abs(np.asarray(x) - np.asarray(y)).max())
    scale = float(np.abs(np.asarray(y)).max())
    assert err <= rtol * scale + atol, (
        f"{jax.tree_util.keystr(path[0])}: max |diff| {err} vs scale {scale}")


def build(config, mesh, total_steps=100):
  method = methods.get(config.method)
  model = method.make_network(config)
  tx, lr_fn = optim.build_optimizer(config, total_steps, 10)
  tau_fn = (optim.tau_schedule(config.tau_base, total_steps)
            if method.HAS_TARGET else None)
  state = train_state.create(config, model, tx, mesh, method.HAS_TARGET)
  fn = step_lib.make_train_step(config, model, tx, lr_fn, tau_fn)
  return state, fn


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr"])
def test_one_step_same_on_1_and_8_devices(cifar_npz, method):
  config = tiny_config(cifar_npz, method)
  host_batch = real_batch(cifar_npz, 16)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    state, fn = build(config, mesh)
    step = step_lib.jit_train_step(fn, mesh)
    batch = sharding.global_batch(host_batch, mesh)
    assert batch["view1"].sharding == sharding.batch_sharding(mesh)
    for _ in range(2):
      state, metrics = step(state, batch)
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == len(devices)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s8, m8) = results
  assert int(s1.step) == int(s8.step) == 2
  # Reductions run in another order on 8 devices, so leaves agree to float
  # round-off relative to each leaf's scale (LARS's trust ratio can amplify
  # round-off in leaves whose gradient is tiny); batch-norm biases start at 0
  # and move by about 1e-3, and differ by a few 1e-6.
  assert_close_to_scale(s1.params, s8.params)
  assert_close_to_scale(s1.batch_stats, s8.batch_stats)
  assert_close_to_scale(s1.target, s8.target)
  chex.assert_trees_all_close(m1, m8, rtol=1e-4, atol=1e-5)
  # The step really changed the state.
  s0, _ = build(config, sharding.make_mesh(jax.devices()[:1]))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       jax.device_get(s0.params), s1.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_step_traced_once_and_state_donated(cifar_npz):
  config = tiny_config(cifar_npz)
  mesh = sharding.make_mesh()
  state, fn = build(config, mesh)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return fn(state, batch)

  step = step_lib.jit_train_step(counted, mesh)
  for i in range(4):
    old = state
    state, metrics = step(
        state, sharding.global_batch(real_batch(cifar_npz, 16, seed=i), mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params))
  jax.block_until_ready(metrics)
  assert len(traces) == 1
  assert int(state.step) == 4
  assert set(metrics) >= {"loss", "classifier_loss", "classifier_accuracy",
                          "lr", "tau", "embedding_std"}
  # EMA: the target moved, but by less than the online network.
  assert state.target is not None

