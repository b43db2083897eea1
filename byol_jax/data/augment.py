"""Device-side image augmentations in JAX (one image f32 [H, W, 3] in [0, 1]).

BYOL's order (DESIGN section 3): flip, colour jitter (random order),
grayscale, blur, solarize, normalisation; colour ops match `tf.image`.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # As tf.image.rgb_to_grayscale.
BLUR_SIGMA = (0.1, 2.0)

# Indices of the colour ops in a jitter permutation.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_NUM_DRAWS = 14  # Uniforms per image and view (see sample_params).


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; floating inputs pass as float32."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images.astype(jnp.float32)


def adjust_brightness(image: jax.Array, delta: jax.Array | float) -> jax.Array:
  """Adds `delta` to every pixel (tf.image.adjust_brightness; no clipping)."""
  return image + delta


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """(x - mean) * factor + mean, mean per channel of [..., H, W, C]."""
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)  # [..., 1, 1, C]
  return (image - mean) * factor + mean


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """[..., 3] RGB in [0, 1] -> HSV with hue in [0, 1) (as tf.image)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe_v = jnp.where(value > 0, value, 1.0)
  safe_c = jnp.where(chroma > 0, chroma, 1.0)
  sat = jnp.where(value > 0, chroma / safe_v, 0.0)
  hue = jnp.where(
      value == r, (g - b) / safe_c,
      jnp.where(value == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
  hue = jnp.where(chroma > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
  return jnp.stack([hue, sat, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """[..., 3] HSV (hue in [0, 1)) -> RGB."""
  hue, sat, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  n = jnp.asarray([5.0, 3.0, 1.0])                           # R, G, B
  k = jnp.mod(n + hue[..., None] * 6.0, 6.0)                 # [..., 3]
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return value[..., None] * (1.0 - sat[..., None] * ramp)


def adjust_hsv(image: jax.Array, saturation: jax.Array | float = 1.0,
               hue: jax.Array | float = 0.0) -> jax.Array:
  """Scales saturation (clipped to [0, 1]) and shifts hue in one HSV trip."""
  hsv = rgb_to_hsv(image)
  h = jnp.mod(hsv[..., 0] + hue, 1.0)
  s = jnp.clip(hsv[..., 1] * saturation, 0.0, 1.0)
  return hsv_to_rgb(jnp.stack([h, s, hsv[..., 2]], axis=-1))


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """HSV saturation times `factor`, clipped (tf.image.adjust_saturation)."""
  return adjust_hsv(image, saturation=factor)


def adjust_hue(image: jax.Array, delta: jax.Array | float) -> jax.Array:
  """Rotates the HSV hue by `delta` turns, in [-0.5, 0.5] (tf.image.adjust_hue)."""
  return adjust_hsv(image, hue=delta)


def rgb_to_grayscale(image: jax.Array) -> jax.Array:
  """Luma (0.2989 R + 0.5870 G + 0.1140 B) repeated over the 3 channels."""
  luma = image @ jnp.asarray(LUMA_WEIGHTS, image.dtype)      # [..., H, W]
  return jnp.repeat(luma[..., None], 3, axis=-1)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  """x if x < threshold else 1 - x."""
  return jnp.where(image < threshold, image, 1.0 - image)


def flip_left_right(image: jax.Array) -> jax.Array:
  """Mirrors one image [H, W, C] horizontally."""
  return image[:, ::-1, :]


def random_flip(rng: jax.Array, image: jax.Array, prob: float = 0.5
                ) -> jax.Array:
  """Mirrors one image [H, W, C] with probability `prob`."""
  return jnp.where(jax.random.bernoulli(rng, prob), flip_left_right(image),
                   image)


def blur_kernel_size(height: int) -> int:
  """Odd kernel of about a tenth of the side: 23 for 224 px, 3 for 32 px."""
  return 2 * (height // 20) + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array | float,
                  kernel_size: int | None = None) -> jax.Array:
  """Separable Gaussian blur of one image [H, W, C], reflect padding, as
  shifted slices: a traced per-image `sigma` under vmap stays elementwise."""
  h, w, _ = image.shape
  size = kernel_size or blur_kernel_size(h)
  radius = size // 2
  if radius == 0:
    return image
  # Reflect padding needs radius < side.
  radius = min(radius, h - 1, w - 1)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)       # [K]
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  weights = weights / jnp.sum(weights)                               # [K]

  def blur_axis(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="reflect")       # [H + 2r, W, C] along `axis`
    n = x.shape[axis]
    return sum(weights[t] * jax.lax.slice_in_dim(xp, t, t + n, axis=axis)
               for t in range(2 * radius + 1))

  return blur_axis(blur_axis(image, 0), 1)


def normalize(images: jax.Array) -> jax.Array:
  """(x - ImageNet mean) / ImageNet std over the last (channel) axis."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (to_float(images) - mean) / std


_normalize_images = normalize  # `augment_view` has an argument named normalize.


def color_jitter(image: jax.Array, order: jax.Array, brightness: jax.Array,
                 contrast: jax.Array, saturation: jax.Array,
                 hue: jax.Array) -> jax.Array:
  """Brightness, contrast, saturation and hue in the order `order`, clipped.

  `order`: int32 [4], a permutation of (brightness, contrast, saturation,
  hue). Each slot runs one fused op, the identity but for the op of `order`.
  """
  def slot(i, x):
    op = order[i]
    x = jnp.clip(x + jnp.where(op == _BRIGHTNESS, brightness, 0.0), 0.0, 1.0)
    x = jnp.clip(adjust_contrast(x, jnp.where(op == _CONTRAST, contrast, 1.0)),
                 0.0, 1.0)
    x = adjust_hsv(x, saturation=jnp.where(op == _SATURATION, saturation, 1.0),
                   hue=jnp.where(op == _HUE, hue, 0.0))
    return jnp.clip(x, 0.0, 1.0)

  # A loop, not 4 unrolled copies: a quarter of the compile time.
  return jax.lax.fori_loop(0, 4, slot, image)


def sample_params(rng: jax.Array, view_cfg: Mapping[str, Any]
                  ) -> dict[str, jax.Array]:
  """The random decisions of one image for one view (`view_cfg` as
  `config_lib.view_augment()`), from one draw of 14 uniforms (cheaper to
  compile than a PRNG call per decision)."""
  u = jax.random.uniform(rng, (_NUM_DRAWS,), jnp.float32)         # [14]
  between = lambda x, lo, hi: lo + (hi - lo) * x
  p = lambda key: float(view_cfg[key])
  b, c, s, h = (p(k) for k in ("brightness", "contrast", "saturation", "hue"))
  return dict(
      flip=u[0] < p("flip"),
      jitter=u[1] < p("color_jitter"),
      order=jnp.argsort(u[2:6]).astype(jnp.int32),
      brightness=between(u[6], -b, b),
      contrast=between(u[7], 1.0 - c, 1.0 + c),
      saturation=between(u[8], 1.0 - s, 1.0 + s),
      hue=between(u[9], -h, h),
      grayscale=u[10] < p("grayscale"),
      blur=u[11] < p("blur"),
      sigma=between(u[12], *BLUR_SIGMA),
      solarize=u[13] < p("solarize"),
  )


def _maybe(prob: float, flag: jax.Array, fn, x: jax.Array) -> jax.Array:
  """fn(x) where `flag`; p = 0 drops the op, p = 1 the select."""
  if prob <= 0.0:
    return x
  if prob >= 1.0:
    return fn(x)
  return jnp.where(flag, fn(x), x)


def apply_params(params: Mapping[str, jax.Array], image: jax.Array,
                 view_cfg: Mapping[str, Any]) -> jax.Array:
  """Applies the decisions of `sample_params` to one image [H, W, 3] in [0, 1]."""
  jitter = ("order", "brightness", "contrast", "saturation", "hue")
  ops = (("flip", "flip", flip_left_right),
         ("color_jitter", "jitter",
          lambda y: color_jitter(y, *(params[k] for k in jitter))),
         ("grayscale", "grayscale", rgb_to_grayscale),
         ("blur", "blur", lambda y: gaussian_blur(y, params["sigma"])),
         ("solarize", "solarize", solarize))
  x = image
  for prob, flag, fn in ops:                   # (config key, decision, op)
    x = _maybe(float(view_cfg[prob]), params[flag], fn, x)
  return jnp.clip(x, 0.0, 1.0)  # Blur and luma weights may round past 1.


def augment_view(rng: jax.Array, images: jax.Array,
                 view_cfg: Mapping[str, Any], normalize: bool = True
                 ) -> jax.Array:
  """Augments a batch [B, H, W, 3] (uint8, or float in [0, 1]) with one
  view's distribution (T or T'): float32, normalised if `normalize`."""
  x = to_float(images)                                   # [B, H, W, 3]
  keys = jax.random.split(rng, x.shape[0])               # [B] keys
  params = jax.vmap(lambda k: sample_params(k, view_cfg))(keys)
  x = jax.vmap(lambda p, im: apply_params(p, im, view_cfg))(params, x)
  return _normalize_images(x) if normalize else x


def augment_views(rng: jax.Array, batch: Mapping[str, jax.Array],
                  augment_cfg: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  """(view1, view2) f32 [B, S, S, 3]: both views of a pretraining batch
  {'view1', 'view2'} augmented with independent keys (`config.augment`)."""
  k1, k2 = jax.random.split(rng)
  norm = bool(augment_cfg.get("normalize", True))
  return (augment_view(k1, batch["view1"], augment_cfg["view1"], norm),
          augment_view(k2, batch["view2"], augment_cfg["view2"], norm))
