"""Numerical identities of the BYOL, SimSiam and SimCLR losses and the EMA."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import sharding
from byol_jax.core.methods import byol, simclr, simsiam


def _rand(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


# ----------------------------------------------------------------- BYOL -----
def test_byol_regression_loss_identities():
  p = _rand(0, (16, 32))
  np.testing.assert_allclose(byol.regression_loss(p, p), 0.0, atol=1e-6)
  np.testing.assert_allclose(byol.regression_loss(p, -p), 4.0, atol=1e-6)
  z = _rand(1, (16, 32))
  # Invariant to positive scaling of either argument.
  np.testing.assert_allclose(byol.regression_loss(3.0 * p, 0.1 * z),
                             byol.regression_loss(p, z), rtol=1e-5)
  # Equals the squared distance of the normalised vectors.
  pn = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
  zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(byol.regression_loss(p, z),
                             jnp.sum((pn - zn) ** 2, -1), rtol=1e-5, atol=1e-6)


def test_byol_symmetric_loss_sums_directions():
  p1, p2, z1, z2 = (_rand(i, (8, 16)) for i in range(4))
  expected = jnp.mean(byol.regression_loss(p1, z2) +
                      byol.regression_loss(p2, z1))
  np.testing.assert_allclose(byol.symmetric_loss(p1, p2, z1, z2), expected,
                             rtol=1e-6)
  # Opposite directions in both: 4 + 4 per example, not their average.
  np.testing.assert_allclose(byol.symmetric_loss(p1, p2, -p2, -p1), 8.0,
                             rtol=1e-6)
  # No gradient reaches the targets.
  g = jax.grad(lambda z: byol.symmetric_loss(p1, p2, z, z2))(z1)
  chex.assert_trees_all_close(g, jnp.zeros_like(g))


def test_ema_moves_each_leaf_by_one_minus_tau():
  target = {"encoder": {"w": _rand(0, (3, 4))}, "projector": {"b": _rand(1, (4,))}}
  online = {"encoder": {"w": _rand(2, (3, 4))}, "projector": {"b": _rand(3, (4,))},
            "predictor": {"w": _rand(4, (4, 4))}}
  tau = 0.99
  new = byol.update_target(target, online, tau)
  assert set(new) == {"encoder", "projector"}
  for k in target:
    for name in target[k]:
      np.testing.assert_allclose(
          new[k][name] - target[k][name],
          (1 - tau) * (online[k][name] - target[k][name]), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------- SimSiam -----
def test_simsiam_loss_identities_and_stop_gradient():
  p = _rand(0, (8, 16))
  np.testing.assert_allclose(simsiam.symmetric_loss(p, p, p, p), -1.0, rtol=1e-6)
  np.testing.assert_allclose(simsiam.symmetric_loss(p, p, -p, -p), 1.0, rtol=1e-6)
  p1, p2, z1, z2 = (_rand(i, (8, 16)) for i in range(4))
  # Scale-invariant. The loss of random vectors is near 0 (a mean of
  # cosines), so the tolerance is absolute: float32 rounding of cosines.
  np.testing.assert_allclose(
      simsiam.symmetric_loss(2 * p1, 5 * p2, 0.5 * z1, 7 * z2),
      simsiam.symmetric_loss(p1, p2, z1, z2), rtol=0, atol=1e-6)
  gz = jax.grad(lambda z1, z2: simsiam.symmetric_loss(p1, p2, z1, z2),
                argnums=(0, 1))(z1, z2)
  chex.assert_trees_all_close(gz, jax.tree.map(jnp.zeros_like, gz))
  gp = jax.grad(lambda p: simsiam.symmetric_loss(p, p2, z1, z2))(p1)
  assert float(jnp.abs(gp).sum()) > 0


# --------------------------------------------------------------- SimCLR -----
def _nt_xent_numpy(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    j = (i + n) % n2
    sims = z[i] @ z.T / t
    denom = sum(np.exp(sims[k]) for k in range(n2) if k != i)
    total += -np.log(np.exp(sims[j]) / denom)
  return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_numpy(t):
  z1 = np.asarray(_rand(0, (6, 5)))
  z2 = np.asarray(_rand(1, (6, 5)))
  np.testing.assert_allclose(simclr.nt_xent(z1, z2, t),
                             _nt_xent_numpy(z1, z2, t), rtol=1e-5)


def test_nt_xent_same_on_8_devices_and_1():
  assert len(jax.devices()) == 8
  z1 = _rand(0, (32, 16))
  z2 = _rand(1, (32, 16))
  values = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    sh = sharding.batch_sharding(mesh)
    a, b = jax.device_put(z1, sh), jax.device_put(z2, sh)
    assert len(a.sharding.device_set) == len(devices)
    values.append(jax.jit(simclr.nt_xent, static_argnums=2)(a, b, 0.2))
  np.testing.assert_allclose(values[0], values[1], rtol=1e-6)
  # And it is the loss over the GLOBAL batch, not a mean of per-shard losses.
  shard_mean = np.mean([simclr.nt_xent(z1[i:i + 4], z2[i:i + 4], 0.2)
                        for i in range(0, 32, 4)])
  assert abs(float(values[1]) - shard_mean) > 1e-3
  np.testing.assert_allclose(values[1], _nt_xent_numpy(
      np.asarray(z1), np.asarray(z2), 0.2), rtol=1e-5)


def test_losses_have_finite_gradients_at_a_zero_row():
  """A ReLU layer can output an all-zero row; its gradient must stay finite."""
  p = _rand(0, (4, 8)).at[1].set(0.0)
  z = _rand(1, (4, 8))
  for loss in (lambda p: byol.symmetric_loss(p, p, z, z),
               lambda p: simsiam.symmetric_loss(p, p, z, z),
               lambda p: simclr.nt_xent(p, z, 0.5)):
    g = jax.grad(loss)(p)
    assert np.isfinite(np.asarray(g)).all()
