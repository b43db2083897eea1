"""Device-side augmentations: agreement with tf.image, probabilities, ranges."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_jax.trainer import config_lib
from byol_jax.data import augment


def _decode(npz, split, indices):
  off = npz[f"{split}_offsets"]
  data = npz[f"{split}_jpeg"]
  return [np.asarray(Image.open(io.BytesIO(
      data[off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in indices]


@pytest.fixture(scope="module")
def nette(imagenette_npz):
  """8 real 224 px Imagenette images, float32 [8, 224, 224, 3] in [0, 1]."""
  with np.load(imagenette_npz) as d:
    images = _decode(d, "train", range(0, 300, 38))
  return np.stack(images).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def small(imagenette_npz):
  """64 real images at 48 px, uint8 [64, 48, 48, 3]."""
  with np.load(imagenette_npz) as d:
    images = _decode(d, "train", range(0, 300, 300 // 64)[:64])
  return np.stack([np.asarray(Image.fromarray(im).resize((48, 48),
                                                         Image.BICUBIC))
                   for im in images])


@pytest.fixture(scope="module")
def tf():
  tf = pytest.importorskip("tensorflow")
  tf.config.set_visible_devices([], "GPU")
  return tf


@pytest.mark.parametrize("op,tf_name,values", [
    ("adjust_brightness", "adjust_brightness", [-0.4, -0.1, 0.25, 0.4]),
    ("adjust_contrast", "adjust_contrast", [0.6, 0.9, 1.2, 1.4]),
    ("adjust_saturation", "adjust_saturation", [0.2, 0.8, 1.2, 1.8]),
    ("adjust_hue", "adjust_hue", [-0.1, -0.03, 0.07, 0.1, 0.5]),
])
def test_colour_op_matches_tf(nette, tf, op, tf_name, values):
  fn = jax.jit(jax.vmap(getattr(augment, op), in_axes=(0, None)))
  for v in values:
    want = np.clip(getattr(tf.image, tf_name)(nette, v).numpy(), 0.0, 1.0)
    got = np.clip(np.asarray(fn(nette, v)), 0.0, 1.0)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{op}({v})")


def test_grayscale_matches_tf(nette, tf):
  want = tf.image.rgb_to_grayscale(nette).numpy()             # [B, H, W, 1]
  got = np.asarray(augment.rgb_to_grayscale(nette))          # [B, H, W, 3]
  np.testing.assert_allclose(got, np.repeat(want, 3, -1), atol=1e-6)


def test_hsv_round_trip(nette):
  back = jax.jit(lambda x: augment.hsv_to_rgb(augment.rgb_to_hsv(x)))(nette)
  np.testing.assert_allclose(np.asarray(back), nette, atol=2e-6)


def _np_blur(image, sigma, r):
  """NumPy reference: separable (2r + 1)-tap Gaussian, reflect padding."""
  t = np.arange(-r, r + 1)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k /= k.sum()
  h, w = image.shape[:2]
  ref = np.pad(image, ((r, r), (0, 0), (0, 0)), mode="reflect")
  ref = sum(k[i] * ref[i:i + h] for i in range(2 * r + 1))
  ref = np.pad(ref, ((0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(k[i] * ref[:, i:i + w] for i in range(2 * r + 1))


def test_blur_kernel_and_reference(nette):
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(128) == 13
  assert augment.blur_kernel_size(32) == 3
  image = nette[0]
  sigma = 1.5
  blur = jax.jit(augment.gaussian_blur)
  got = np.asarray(blur(image, sigma))
  np.testing.assert_allclose(got, _np_blur(image, sigma, 11), atol=1e-5)
  # Tiny sigma is the identity; a constant image stays constant.
  np.testing.assert_allclose(np.asarray(blur(image, 0.1)), image, atol=1e-5)
  const = np.full((32, 32, 3), 0.3, np.float32)
  np.testing.assert_allclose(np.asarray(augment.gaussian_blur(const, 2.0)),
                             const, atol=1e-6)
  # Blurring lowers the high-frequency energy.
  assert np.abs(np.diff(got, axis=1)).mean() < np.abs(
      np.diff(image, axis=1)).mean()


def test_solarize_flip_normalize():
  x = jnp.asarray([[[[0.1, 0.5, 0.9]]]])
  np.testing.assert_allclose(augment.solarize(x), [[[[0.1, 0.5, 0.1]]]],
                             atol=1e-7)
  img = jnp.arange(12.0).reshape(2, 2, 3)
  np.testing.assert_array_equal(augment.flip_left_right(img), img[:, ::-1])
  flips = jax.vmap(lambda k: augment.random_flip(k, img))(
      jax.random.split(jax.random.PRNGKey(0), 400))
  frac = np.mean(np.all(np.asarray(flips) == np.asarray(img[:, ::-1]),
                        axis=(1, 2, 3)))
  assert 0.4 < frac < 0.6
  ones = jnp.ones((1, 2, 2, 3))
  np.testing.assert_allclose(
      augment.normalize(ones)[0, 0, 0],
      (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD),
      rtol=1e-6)
  u8 = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  np.testing.assert_allclose(augment.normalize(u8), augment.normalize(ones))


def test_color_jitter_order_and_clipping(nette, tf):
  image = nette[1]
  params = dict(brightness=0.3, contrast=1.3, saturation=0.7, hue=0.08)
  tf_ops = [lambda x: tf.image.adjust_brightness(x, params["brightness"]),
            lambda x: tf.image.adjust_contrast(x, params["contrast"]),
            lambda x: tf.image.adjust_saturation(x, params["saturation"]),
            lambda x: tf.image.adjust_hue(x, params["hue"])]
  jitter = jax.jit(augment.color_jitter)
  results = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
    want = image
    for i in order:
      want = np.clip(tf_ops[i](want).numpy(), 0.0, 1.0)
    got = np.asarray(jitter(image, jnp.asarray(order, jnp.int32), **params))
    np.testing.assert_allclose(got, want, atol=5e-5)
    assert got.min() >= 0.0 and got.max() <= 1.0
    results.append(got)
  # The order matters.
  assert np.abs(results[0] - results[1]).max() > 0.01


def test_sampled_orders_are_uniform_permutations():
  cfg = config_lib.view_augment()
  keys = jax.random.split(jax.random.PRNGKey(1), 4800)
  orders = np.asarray(jax.vmap(lambda k: augment.sample_params(k, cfg))(
      keys)["order"])
  assert np.all(np.sort(orders, axis=1) == np.arange(4))
  _, counts = np.unique(orders, axis=0, return_counts=True)
  assert len(counts) == 24
  assert counts.min() > 120 and counts.max() < 280        # 200 expected.


@pytest.mark.parametrize("view,expect", [
    ("view1", dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=1.0,
                   solarize=0.0)),
    ("view2", dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.1,
                   solarize=0.2)),
])
def test_empirical_probabilities_per_view(view, expect):
  cfg = config_lib.base_config().augment[view]
  n = 8000
  keys = jax.random.split(jax.random.PRNGKey(7), n)
  params = jax.jit(jax.vmap(lambda k: augment.sample_params(k, cfg)))(keys)
  for name, p in expect.items():
    freq = float(np.mean(np.asarray(params[name])))
    tol = 4 * np.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-3
    assert abs(freq - p) < tol, (view, name, freq, p)
  b = np.asarray(params["brightness"])
  c = np.asarray(params["contrast"])
  s = np.asarray(params["saturation"])
  h = np.asarray(params["hue"])
  sig = np.asarray(params["sigma"])
  for x, lo, hi in ((b, -0.4, 0.4), (c, 0.6, 1.4), (s, 0.8, 1.2),
                    (h, -0.1, 0.1), (sig, 0.1, 2.0)):
    assert x.min() >= lo and x.max() <= hi
    assert x.min() < lo + 0.05 * (hi - lo) and x.max() > hi - 0.05 * (hi - lo)


def _reference_view(image, p, tf):
  """One view from its decisions `p`, with tf.image and NumPy (not augment)."""
  x = image[:, ::-1] if p["flip"] else image
  if p["jitter"]:
    ops = (lambda y: tf.image.adjust_brightness(y, p["brightness"]),
           lambda y: tf.image.adjust_contrast(y, p["contrast"]),
           lambda y: tf.image.adjust_saturation(y, p["saturation"]),
           lambda y: tf.image.adjust_hue(y, p["hue"]))
    for i in p["order"]:
      x = np.clip(ops[i](x).numpy(), 0.0, 1.0)
  if p["grayscale"]:
    x = np.repeat(tf.image.rgb_to_grayscale(x).numpy(), 3, axis=-1)
  if p["blur"]:
    x = _np_blur(x, float(p["sigma"]), 2)           # 5 taps at 48 px.
  if p["solarize"]:
    x = np.where(x < 0.5, x, 1.0 - x)
  return np.clip(x, 0.0, 1.0)


def test_view_outputs_follow_the_decisions(small, tf):
  """Grayscale measured on the outputs matches its probability; each output
  is its sampled decisions applied by an independent tf.image / NumPy
  reference."""
  cfg2 = config_lib.base_config().augment.view2
  images = np.concatenate([small] * 8)                   # [512, 48, 48, 3]
  fn = jax.jit(lambda k, x: augment.augment_view(k, x, cfg2, normalize=False))
  out = np.asarray(fn(jax.random.PRNGKey(3), images))
  assert out.shape == images.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  gray = np.all(out[..., :1] == out, axis=(1, 2, 3))
  assert abs(gray.mean() - 0.2) < 0.07, gray.mean()
  # Every op at probability 1/2, so that 24 images see each op on and off.
  cfg = config_lib.view_augment(color_jitter=0.5, grayscale=0.5, blur=0.5,
                                solarize=0.5)
  x = images[:24].astype(np.float32) / 255
  key = jax.random.PRNGKey(5)
  out = np.asarray(jax.jit(lambda k, x: augment.augment_view(
      k, x, cfg, normalize=False))(key, x))
  # augment_view splits its key per image; the decisions of image i:
  keys = jax.random.split(key, x.shape[0])
  params = jax.tree.map(np.asarray, jax.vmap(
      lambda k: augment.sample_params(k, cfg))(keys))
  for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
    assert 0 < params[name].sum() < x.shape[0], name
  for i in range(x.shape[0]):
    p = {k: v[i] for k, v in params.items()}
    np.testing.assert_allclose(out[i], _reference_view(x[i], p, tf),
                               atol=1e-4, err_msg=str(p))


def test_augment_views_shapes_dtypes_and_normalisation(small):
  cfg = config_lib.base_config().augment
  batch = dict(view1=jnp.asarray(small[:16]),
               view2=jnp.asarray(small[:16]).astype(jnp.float32) / 255)
  fn = jax.jit(lambda r, b: augment.augment_views(r, b, cfg))
  v1, v2 = fn(jax.random.PRNGKey(0), batch)
  for v in (v1, v2):
    assert v.shape == (16, 48, 48, 3) and v.dtype == jnp.float32
    lo = (0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    hi = (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    v = np.asarray(v)
    assert np.all(v >= lo - 1e-5) and np.all(v <= hi + 1e-5)
  # Independent keys per view: the same crops give different views.
  assert np.abs(np.asarray(v1) - np.asarray(v2)).mean() > 0.05
  cfg.normalize = False
  u1, _ = jax.jit(lambda r, b: augment.augment_views(r, b, cfg))(
      jax.random.PRNGKey(0), batch)
  np.testing.assert_allclose(np.asarray(augment.normalize(u1)), np.asarray(v1),
                             atol=1e-5)
