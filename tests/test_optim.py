"""LARS against a NumPy transcription of the reference, schedules, builder."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from byol_jax.trainer import config_lib
from byol_jax import errors
from byol_jax.core import optim


def _params():
  rng = np.random.default_rng(0)
  return {
      "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      "bn": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
             "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
      # A zero-initialised kernel: ||p|| = 0, so the trust ratio must be 1.
      "zero_kernel": jnp.zeros((2, 2), jnp.float32),
  }


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


def _reference_lars(params, grads, lrs, wd, eta, momentum):
  """The official BYOL LARS, leaf by leaf in float64; returns every update."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  flat_p, treedef = jax.tree.flatten(params)
  trace = [np.zeros_like(p) for p in flat_p]
  all_updates = []
  for g_tree, lr in zip(grads, lrs):
    flat_g = [np.asarray(g, np.float64) for g in jax.tree.leaves(g_tree)]
    updates = []
    for i, (p, g) in enumerate(zip(flat_p, flat_g)):
      u = g
      if p.ndim > 1:  # kernels: decay and trust; biases and BN: neither
        u = g + wd * p
        p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
        trust = eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
        u = trust * u
      trace[i] = momentum * trace[i] + u
      updates.append(-lr * trace[i])
    flat_p = [p + u for p, u in zip(flat_p, updates)]
    all_updates.append(jax.tree.unflatten(treedef, updates))
  return all_updates


def test_exclude_bias_and_bn():
  mask = optim.exclude_bias_and_bn(_params())
  assert mask == {"kernel": True, "bias": False,
                  "bn": {"scale": False, "bias": False}, "zero_kernel": True}


def test_lars_matches_reference_over_two_steps():
  wd, eta, momentum = 0.1, 1e-3, 0.9
  lrs = [0.5, 2.0]  # lr changes between steps: it must act after the trace
  tx = optim.lars(lambda count: jnp.asarray(lrs)[count], weight_decay=wd,
                  momentum=momentum, eta=eta)
  params = _params()
  grads = [_grads(0), _grads(1)]
  expected = _reference_lars(params, grads, lrs, wd, eta, momentum)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(2):
    updates, state = update(grads[step], state, params)
    chex.assert_trees_all_close(updates, expected[step], rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)


def _reference_solo_learn_lars(params, grads, lrs, wd, eta, momentum):
  """solo-learn's LARS with clip_lr, leaf by leaf in float64."""
  flat_p, treedef = jax.tree.flatten(
      jax.tree.map(lambda x: np.asarray(x, np.float64), params))
  trace = [np.zeros_like(p) for p in flat_p]
  all_updates = []
  for g_tree, lr in zip(grads, lrs):
    updates = []
    for i, (p, g) in enumerate(zip(flat_p, map(np.asarray, jax.tree.leaves(
        g_tree)))):
      d = g.astype(np.float64)
      p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(d)
      if p.ndim > 1 and p_norm != 0 and g_norm != 0:
        trust = eta * p_norm / (g_norm + p_norm * wd + 1e-8)
        d = (d + wd * p) * (min(trust / lr, 1.0) if lr else 1.0)
      trace[i] = momentum * trace[i] + d
      updates.append(-lr * trace[i])
    flat_p = [p + u for p, u in zip(flat_p, updates)]
    all_updates.append(jax.tree.unflatten(treedef, updates))
  return all_updates


def test_lars_clip_lr_matches_solo_learn_over_three_steps():
  """eta 0.02 with LR clipping (the CIFAR recipes of DESIGN 5): a kernel
  whose trust exceeds lr is clipped to factor 1 (plain SGD with decay), the
  others scaled by trust / lr; a zero kernel takes g with no decay; biases
  and BN neither; lr 0 on the first step."""
  wd, eta, momentum = 1e-5, 0.02, 0.9
  lrs = [0.0, 0.5, 2.0]
  tx = optim.lars(lambda count: jnp.asarray(lrs)[count], weight_decay=wd,
                  momentum=momentum, eta=eta, clip_lr=True)
  params = dict(_params(), big_kernel=1e3 * _params()["kernel"])
  grads = [dict(_grads(s), big_kernel=_grads(s)["kernel"]) for s in range(3)]
  expected = _reference_solo_learn_lars(params, grads, lrs, wd, eta, momentum)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    updates, state = update(grads[step], state, params)
    chex.assert_trees_all_close(updates, expected[step], rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)
  # The clip binds on the big kernel (SGD-like) and not on the other.
  p = np.asarray(params["big_kernel"])
  assert eta * np.linalg.norm(p) / np.linalg.norm(grads[2]["kernel"]) > 2.0
  p = np.asarray(params["kernel"])
  assert eta * np.linalg.norm(p) / np.linalg.norm(grads[2]["kernel"]) < 0.5


def test_lars_first_step_by_hand():
  p = np.array([[3.0, 4.0]])          # ||p|| = 5
  g = np.array([[0.0, 1.0]])
  wd, eta, lr = 0.5, 0.1, 2.0
  u = g + wd * p                      # [[1.5, 3.0]]
  trust = eta * 5.0 / np.linalg.norm(u)
  params = {"w": jnp.asarray(p, jnp.float32), "b": jnp.ones(2)}
  tx = optim.lars(lr, weight_decay=wd, eta=eta)
  updates, _ = tx.update({"w": jnp.asarray(g, jnp.float32), "b": jnp.ones(2)},
                         tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -lr * trust * u, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -lr * np.ones(2), rtol=1e-6)


def test_lars_zero_gradient_gives_trust_one_and_no_nan():
  params = {"w": jnp.ones((2, 2))}
  tx = optim.lars(1.0, weight_decay=0.0)
  updates, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], 0.0)


def test_lr_schedule():
  peak, total, warmup = 2.0, 110, 10
  schedule = optim.lr_schedule(peak, total, warmup)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 1.0, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), peak / 2, rtol=1e-6)  # midpoint
  np.testing.assert_allclose(
      schedule(35), peak * 0.5 * (1 + math.cos(math.pi * 0.25)), rtol=1e-6)
  np.testing.assert_allclose(schedule(total), 0.0, atol=1e-7)
  np.testing.assert_allclose(schedule(total + 5), 0.0, atol=1e-7)
  # Traced steps work too.
  values = jax.jit(jax.vmap(schedule))(jnp.arange(total + 1))
  assert np.all(np.diff(np.asarray(values[:warmup + 1])) > 0)
  assert np.all(np.diff(np.asarray(values[warmup:])) <= 1e-7)


def test_lr_schedule_without_warmup_starts_at_peak():
  schedule = optim.lr_schedule(1.0, 10, 0)
  np.testing.assert_allclose(schedule(0), 1.0)
  np.testing.assert_allclose(schedule(10), 0.0, atol=1e-7)


def test_tau_schedule():
  tau_base, total = 0.99, 1000
  tau = optim.tau_schedule(tau_base, total)
  np.testing.assert_allclose(tau(0), tau_base, rtol=1e-6)
  np.testing.assert_allclose(tau(total // 2), (1 + tau_base) / 2, rtol=1e-6)
  np.testing.assert_allclose(tau(total), 1.0, rtol=1e-6)
  traced = jax.jit(tau)(jnp.asarray(total // 2, jnp.int32))
  np.testing.assert_allclose(traced, (1 + tau_base) / 2, rtol=1e-6)


def test_scaled_lr():
  assert optim.scaled_lr(0.3, 4096) == pytest.approx(4.8)
  assert optim.scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
  assert optim.scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
  with pytest.raises(ValueError, match="linear"):
    optim.scaled_lr(0.1, 256, "cubic")


def _network_params():
  ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
  return {"encoder": {"kernel": ones(2, 3), "bias": ones(3)},
          "projector": {"kernel": ones(3, 3)},
          "predictor": {"kernel": ones(3, 3), "bias": ones(3)},
          "classifier": {"kernel": ones(3, 2), "bias": ones(2)}}


def _sgd_config(fixed_lr_predictor):
  c = config_lib.base_config()
  c.batch_size = 512                 # lr = base_lr * 2
  c.warmup_epochs = 2.0              # 2 steps of warm-up: lr(0) = 0
  c.optimizer.name = "sgd"
  c.optimizer.base_lr = 0.05
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.fixed_lr_predictor = fixed_lr_predictor
  c.optimizer.classifier = "sgd"     # solo-learn's SimSiam: its own SGD
  c.optimizer.classifier_lr = 0.2
  return c


@pytest.mark.parametrize("fixed_lr_predictor", [False, True])
def test_build_optimizer_fixed_lr_predictor(fixed_lr_predictor):
  config = _sgd_config(fixed_lr_predictor)
  tx, schedule = optim.build_optimizer(config, total_steps=10,
                                       steps_per_epoch=1)
  peak = 0.1
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(2), peak, rtol=1e-6)
  params = _network_params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)

  # Step 0: the schedule is at 0; only a fixed-lr predictor moves.
  updates, state = update(grads, state, params)
  for key in ("encoder", "projector", "classifier"):
    chex.assert_trees_all_close(updates[key],
                                jax.tree.map(jnp.zeros_like, params[key]))
  expected_pred = -peak if fixed_lr_predictor else 0.0
  chex.assert_trees_all_close(
      updates["predictor"],
      jax.tree.map(lambda p: jnp.full_like(p, expected_pred),
                   params["predictor"]))

  # Step 1: schedule lr = peak / 2 on a momentum trace 1.9 * g; the
  # classifier's lr is 0.2 * 512 / 256 = 0.4 at the peak, 0.2 here.
  updates, state = update(grads, state, params)
  np.testing.assert_allclose(updates["encoder"]["kernel"], -0.05 * 1.9,
                             rtol=1e-6)
  np.testing.assert_allclose(updates["classifier"]["kernel"], -0.2 * 1.9,
                             rtol=1e-6)
  expected_pred = -peak * 1.9 if fixed_lr_predictor else -0.05 * 1.9
  np.testing.assert_allclose(updates["predictor"]["kernel"], expected_pred,
                             rtol=1e-6)


def test_build_optimizer_sgd_decays_everything_but_classifier():
  config = _sgd_config(False)
  config.warmup_epochs = 0.0
  config.optimizer.weight_decay = 0.5
  tx, _ = optim.build_optimizer(config, total_steps=10, steps_per_epoch=1)
  params = _network_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # SGD decays biases too (SimSiam); the classifier gets no decay.
  np.testing.assert_allclose(updates["encoder"]["bias"], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder"]["kernel"], -0.1 * 0.5,
                             rtol=1e-6)
  chex.assert_trees_all_close(updates["classifier"], zeros["classifier"])


def test_build_optimizer_lars_without_predictor_or_classifier():
  config = config_lib.base_config()
  config.batch_size = 256
  config.warmup_epochs = 0.0
  config.optimizer.fixed_lr_predictor = True  # no predictor key: harmless
  tx, schedule = optim.build_optimizer(config, total_steps=5,
                                       steps_per_epoch=1)
  np.testing.assert_allclose(schedule(0), config.optimizer.base_lr)
  params = {"encoder": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  expected = optim.lars(0.3, weight_decay=1e-6).update(
      grads, optim.lars(0.3).init(params), params)[0]
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_byol_classifier_trains_in_the_lars_chain():
  """BYOL's online classifier as the official code trains it.

  From a zero kernel (trust 1 on the first step, the ratio on the second),
  over two steps of the main schedule, its kernel gets LARS's weight decay
  and trust ratio and its bias neither: the update equals the reference
  LARS on the classifier alone, at the main learning rate.
  """
  config = config_lib.base_config()
  assert config.method == "byol" and config.optimizer.classifier == "main"
  config.batch_size = 512
  config.optimizer.weight_decay = 0.1  # large enough to show in the kernel
  total, warmup = 10, 1
  tx, schedule = optim.build_optimizer(config, total, 1, warmup_steps=warmup)
  params = _network_params()
  params["classifier"] = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
  rng = np.random.default_rng(7)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              jnp.float32), params)
           for _ in range(2)]
  lrs = [float(schedule(1)), float(schedule(2))]
  assert 0 < lrs[0] and lrs[1] < lrs[0] == pytest.approx(0.6)
  expected = _reference_lars(
      params["classifier"], [g["classifier"] for g in grads], lrs,
      wd=0.1, eta=config.optimizer.eta, momentum=0.9)
  state = tx.init(params)
  update = jax.jit(tx.update)
  # Step 0 has lr 0 (warm-up); steps 1 and 2 are the two compared.
  _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
  for step in range(2):
    updates, state = update(grads[step], state, params)
    chex.assert_trees_all_close(updates["classifier"], expected[step],
                                rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, updates)
  # On the second step the kernel is no longer zero and its trust ratio is
  # about 1e-3: SGD with weight decay (trust 1) would differ by about lr * g.
  g1, g2 = (np.asarray(g["classifier"]["kernel"]) for g in grads)
  p1 = -lrs[0] * g1
  sgd = -lrs[1] * (0.9 * g1 + g2 + 0.1 * p1)
  assert np.max(np.abs(updates["classifier"]["kernel"] - sgd)) > 0.1


def test_build_optimizer_unknown_name():
  config = config_lib.base_config()
  config.optimizer.name = "adam"
  with pytest.raises(errors.ConfigError, match="lars.*sgd"):
    optim.build_optimizer(config, total_steps=10, steps_per_epoch=1)
