"""The train step: 1 vs 8 devices, one compilation, donation, and what one
BYOL step does to the state (EMA, target statistics, classifier, bfloat16);
the state it starts from."""
import io
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from byol_jax.core import methods
from byol_jax.core import optim
from byol_jax.core import sharding
from byol_jax.core import step as step_lib
from byol_jax.core import train_state
from byol_jax.data import augment
from testlib import build_step
from testlib import count_compiles


def real_batch(cifar_npz, n, seed=0):
  """n real CIFAR train images (PIL-decoded) as a two-view uint8 batch."""
  with np.load(cifar_npz) as d:
    off, blob = d["train_offsets"], d["train_jpeg"]
    idx = np.random.default_rng(seed).choice(len(off) - 1, n, replace=False)
    images = np.stack([np.asarray(Image.open(io.BytesIO(
        blob[off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in idx])
    labels = d["train_labels"][idx].astype(np.int32)
  return dict(view1=images, view2=images[::-1].copy(), label=labels)


def assert_close_to_scale(a, b, rtol=1e-3, atol=1e-5):
  """Each leaf of a equals b within rtol of b's largest magnitude."""
  chex.assert_trees_all_equal_shapes(a, b)
  for path, x, y in zip(jax.tree_util.tree_leaves_with_path(a),
                        jax.tree.leaves(a), jax.tree.leaves(b)):
    err = float(np.abs(np.asarray(x) - np.asarray(y)).max())
    scale = float(np.abs(np.asarray(y)).max())
    assert err <= rtol * scale + atol, (
        f"{jax.tree_util.keystr(path[0])}: max |diff| {err} vs scale {scale}")


def max_abs_diff(a, b) -> dict:
  """{leaf path: max |a - b|} over two pytrees of the same structure."""
  chex.assert_trees_all_equal_shapes(a, b)
  return {jax.tree_util.keystr(p): float(np.max(np.abs(
      np.asarray(x, np.float64) - np.asarray(y, np.float64))))
          for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                               jax.tree.leaves(b))}


# One config per method for every test here, so that equal programs compile
# once (the persistent compilation cache matches them across tests). No
# warm-up: the first step has the peak learning rate and really moves the
# online network. tau_base 0.7, not 0.5: swapping tau and 1 - tau must show.
TAU_BASE = 0.7
STEP_CONFIG = dict(warmup_epochs=0.0, tau_base=TAU_BASE)


# SimSiam's step has BYOL's structure without the target; SimCLR's global
# NT-Xent is the one that must gather across devices.
@pytest.mark.parametrize("method", ["byol", "simclr"])
def test_one_step_same_on_1_and_8_devices(tiny_config, cifar_npz, method):
  # BYOL's program is the one of the tests below; SimSiam and SimCLR keep
  # the warm-up (with SimSiam's SGD at the peak rate from step 0, round-off
  # in batch-norm biases grows to 1% of their scale in two steps).
  config = tiny_config(method, **(STEP_CONFIG if method == "byol" else {}))
  host_batch = real_batch(cifar_npz, 16)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    state, fn = build_step(config, mesh)
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
  s0, _ = build_step(config, sharding.make_mesh(jax.devices()[:1]))
  moved = max_abs_diff(jax.device_get(s0.params), s1.params)
  assert max(moved.values()) > 0


def test_step_traced_once_and_state_donated(tiny_config, cifar_npz):
  config = tiny_config("byol", **STEP_CONFIG)
  mesh = sharding.make_mesh()
  state, fn = build_step(config, mesh)
  # A host copy made from device copies: reading `state` itself on the host
  # would pin its buffers and defeat the donation checked below.
  start = jax.device_get(jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state))
  traces = []

  def train_step(state, batch):  # the name of the step it counts
    traces.append(1)
    return fn(state, batch)

  step = step_lib.jit_train_step(train_step, mesh)
  for i in range(4):
    old = state
    state, metrics = step(
        state, sharding.global_batch(real_batch(cifar_npz, 16, seed=i), mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params))
  jax.block_until_ready(metrics)
  assert len(traces) == 1
  assert int(state.step) == 4
  assert set(metrics) >= {"loss", "classifier_loss", "classifier_accuracy",
                          "lr", "tau", "embedding_std", "finite"}
  # Every part of the donated state was replaced by a stepped one.
  end = jax.device_get(state)
  for part in ("params", "batch_stats", "target"):
    assert max(max_abs_diff(getattr(start, part),
                            getattr(end, part)).values()) > 0, part


# ------------------------------------------- one BYOL step, in detail -------
def test_initial_state_one_init_program_own_target_key(tiny_config):
  """BYOL's two networks come from one compiled init program, the target
  from its own key; the state is replicated and the same for the same seed."""
  config = tiny_config(**STEP_CONFIG)
  mesh = sharding.make_mesh()
  method = methods.get("byol")
  model = method.make_network(config)
  tx, _ = optim.build_optimizer(config, 100, 10)
  with count_compiles("jit(init_network)") as compiled:
    state = train_state.create(config, model, tx, mesh, True)
  assert compiled[0] == 1, compiled
  again = train_state.create(config, model, tx, mesh, True)
  chex.assert_trees_all_equal(state, again)  # Same seed, same bits.
  rep = sharding.replicated(mesh)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_equivalent_to(rep, leaf.ndim), leaf.sharding
  assert int(state.step) == 0
  # The target: encoder and projector only, initialised from its own key.
  assert sorted(state.target["params"]) == ["encoder", "projector"]
  online = {k: state.params[k] for k in ("encoder", "projector")}
  chex.assert_trees_all_equal_shapes(online, state.target["params"])
  assert not any(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(online), jax.tree.leaves(state.target["params"]))
                 if np.asarray(a).std() > 0)
  chex.assert_trees_all_equal(state.batch_stats["encoder"],
                              state.target["batch_stats"]["encoder"])


@pytest.fixture(scope="module")
def byol_step(tiny_config, cifar_npz):
  """One BYOL step (one device) from one state, with labels and without."""
  config = tiny_config("byol", **STEP_CONFIG)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state0, fn = build_step(config, mesh)
  step = step_lib.jit_train_step(fn, mesh)
  batch = real_batch(cifar_npz, 16, seed=3)
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))  # the step donates
  labelled = jax.device_get(step(copy(state0),
                                 sharding.global_batch(batch, mesh)))
  unlabelled = jax.device_get(step(copy(state0), sharding.global_batch(
      dict(batch, label=np.full_like(batch["label"], -1)), mesh)))
  return types.SimpleNamespace(
      config=config, state0=jax.device_get(state0), batch=batch,
      labelled=labelled, unlabelled=unlabelled,
      model=methods.get("byol").make_network(config))


def test_ema_uses_post_update_online_params(byol_step):
  """target_1 = tau_0 target_0 + (1 - tau_0) online_1, online_1 being the
  parameters after this step's optimizer update, not those before it."""
  s0 = byol_step.state0
  s1, metrics = byol_step.labelled
  tau = float(metrics["tau"])
  assert tau == pytest.approx(float(optim.tau_schedule(TAU_BASE, 100)(0)))
  assert tau == pytest.approx(TAU_BASE)

  def ema(online):
    return jax.tree.map(
        lambda t, p: tau * np.asarray(t, np.float64) + (1 - tau) * np.asarray(
            p, np.float64), s0.target["params"],
        {k: online[k] for k in s0.target["params"]})

  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(
      s0.target["params"]))
  tol = 1e-6 * scale
  post = max_abs_diff(s1.target["params"], ema(s1.params))
  pre = max_abs_diff(s1.target["params"], ema(s0.params))
  assert max(post.values()) <= tol, post
  # The online step is large enough that the pre-update EMA is far off.
  assert max(pre.values()) > 100 * tol, pre


def test_target_runs_in_training_mode_with_its_own_statistics(byol_step):
  s0, config, model = byol_step.state0, byol_step.config, byol_step.model
  s1, _ = byol_step.labelled
  moved = max_abs_diff(s0.target["batch_stats"], s1.target["batch_stats"])
  assert min(moved.values()) > 0, moved  # every BN layer of the target
  apart = max_abs_diff(s1.batch_stats["encoder"],
                       s1.target["batch_stats"]["encoder"])
  assert min(apart.values()) > 0, apart  # not the online network's
  # Exactly the moving averages of the target run in training mode on view
  # 1, then on view 2, each view its own BN batch.
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  view1, view2 = jax.jit(lambda r, b: augment.augment_views(
      r, b, config.augment))(rng, byol_step.batch)

  @jax.jit
  def target_stats(target, view1, view2):
    _, bs = model.apply(target, view1, train=True, method=model.project,
                        mutable=["batch_stats"])
    _, bs = model.apply({"params": target["params"], **bs}, view2,
                        train=True, method=model.project,
                        mutable=["batch_stats"])
    return bs["batch_stats"]

  expected = target_stats(s0.target, view1, view2)
  assert_close_to_scale(s1.target["batch_stats"], expected, rtol=1e-5,
                        atol=1e-6)


def test_classifier_gives_the_rest_exactly_zero_gradient(byol_step):
  """Labels feed only the classifier's loss: with and without them the step
  leaves everything else bit-identical, and the classifier moves."""
  (with_labels, m1), (without, m0) = byol_step.labelled, byol_step.unlabelled
  assert float(m1["classifier_loss"]) > 0 and float(m0["classifier_loss"]) == 0
  rest = lambda p: {k: v for k, v in p.items() if k != "classifier"}  # noqa
  chex.assert_trees_all_equal(rest(with_labels.params), rest(without.params))
  chex.assert_trees_all_equal(with_labels.batch_stats, without.batch_stats)
  chex.assert_trees_all_equal(with_labels.target, without.target)
  assert float(m1["loss"]) == float(m0["loss"])
  # Its own parameters got a non-zero gradient.
  s0 = byol_step.state0
  moved = max_abs_diff(s0.params["classifier"],
                       with_labels.params["classifier"])
  assert min(moved.values()) > 0, moved
  # Without labels it moves only by LARS's weight decay (official BYOL trains
  # it in the main chain): trust eta |p| / |wd p| makes the kernel's update
  # -lr eta p; the bias, excluded, stays.
  lr, eta = float(m0["lr"]), byol_step.config.optimizer.eta
  np.testing.assert_allclose(
      without.params["classifier"]["kernel"],
      s0.params["classifier"]["kernel"] * (1 - lr * eta), rtol=1e-6)
  np.testing.assert_array_equal(without.params["classifier"]["bias"],
                                s0.params["classifier"]["bias"])


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def test_logged_norms_are_the_gradient_update_and_parameters(byol_step):
  """grad_norm, update_norm and param_norm are global L2 norms of this
  step's gradient, the optimizer's update and the new parameters."""
  s0 = byol_step.state0
  s1, m = byol_step.labelled
  assert float(m["param_norm"]) == pytest.approx(_norm(s1.params), rel=1e-5)
  moved = jax.tree.map(np.subtract, s1.params, s0.params)
  assert float(m["update_norm"]) == pytest.approx(_norm(moved), rel=1e-3)
  # With SGD at learning rate 1 the update is minus the gradient, and the
  # gradient is LARS's step's (same state, same batch).
  sgd = optax.sgd(1.0)
  fn = step_lib.make_train_step(
      byol_step.config, byol_step.model, sgd, optax.constant_schedule(1.0),
      optim.tau_schedule(TAU_BASE, 100))
  s, m_sgd = jax.device_get(jax.jit(fn)(
      s0.replace(opt_state=sgd.init(s0.params)), byol_step.batch))
  grads = jax.tree.map(np.subtract, s0.params, s.params)
  assert float(m_sgd["grad_norm"]) == pytest.approx(_norm(grads), rel=1e-3)
  assert float(m_sgd["update_norm"]) == float(m_sgd["grad_norm"])
  assert float(m["grad_norm"]) == pytest.approx(float(m_sgd["grad_norm"]),
                                                rel=1e-4)
  # LARS's update is not the gradient's size.
  assert float(m["update_norm"]) != pytest.approx(float(m["grad_norm"]),
                                                  rel=0.1)


def test_bfloat16_step_is_finite_and_close_to_float32(byol_step, tiny_config):
  config = tiny_config("byol", model__dtype="bfloat16", **STEP_CONFIG)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state0, fn = build_step(config, mesh)
  # The same initial state: params are float32 whatever the compute dtype.
  chex.assert_trees_all_equal(jax.device_get(state0), byol_step.state0)
  s16, m16 = jax.device_get(jax.jit(fn)(state0, byol_step.batch))
  s32, m32 = byol_step.labelled
  assert float(m16["finite"]) == 1.0
  for leaf in jax.tree.leaves((s16.params, s16.batch_stats, s16.target)):
    assert leaf.dtype == np.float32 and np.isfinite(leaf).all()
  # The loss (two directions of 2 - 2 cos, in [0, 8]) within 0.02; measured
  # 3.9024 vs 3.8953, and 2.96333 vs 2.96354 for the classifier's.
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), abs=0.02)
  assert float(m16["classifier_loss"]) == pytest.approx(
      float(m32["classifier_loss"]), abs=0.02)
  # The update points the same way: cosine of each part's whole update
  # vector >= 0.8 (measured: encoder 0.895, projector 0.953, predictor
  # 0.999, classifier 1.000; bfloat16 gradients of a 4-filter ResNet are
  # noisy, not wrong).
  s0 = byol_step.state0
  for part in s0.params:
    u16, u32 = (np.concatenate([np.ravel(a - b) for a, b in zip(
        jax.tree.leaves(s.params[part]), jax.tree.leaves(s0.params[part]))])
                for s in (s16, s32))
    cosine = u16 @ u32 / (np.linalg.norm(u16) * np.linalg.norm(u32))
    assert cosine >= 0.8, (part, cosine)
