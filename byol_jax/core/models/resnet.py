"""ResNet v1 encoders (He et al., 2016) in the torchvision layout.

As torchvision (so converted PyTorch weights behave the same): the
bottleneck's stride sits on its 3x3 convolution, shortcuts become a 1x1
convolution plus batch norm when the shape changes, convolutions carry no
bias. Haiku's `hk.nets.ResNet` (the official BYOL checkpoints) differs only in
padding, so it is a choice:

  'symmetric' (default, PyTorch): k // 2 zeros on every side.
  'same' (TF/Haiku): lax's 'SAME', the odd pixel at the bottom/right; for a
      stride-2 layer on an even input that is one pixel less at the top/left.

The encoder returns the global-average-pooled representation; the online
classifier lives in `methods.network`.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an
# untruncated normal with variance 2 / (kh * kw * out_channels).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Blocks per stage and whether they are bottlenecks, per depth. 10 is the
# smallest of the family (one basic block per stage), for tests and CPUs.
DEPTHS: dict[int, tuple[tuple[int, ...], bool]] = {
    10: ((1, 1, 1, 1), False),
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
PADDINGS = ("symmetric", "same")
_STEMS = ("imagenet", "cifar")


def _pad(k: int, padding: str) -> str | tuple[tuple[int, int], ...]:
  """The padding of a k x k window (convolution or pooling)."""
  return "SAME" if padding == "same" else ((k // 2, k // 2),) * 2


class Block(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 to 4 * filters) block."""
  filters: int
  strides: int
  bottleneck: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False
  padding: str = "symmetric"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    strides = (self.strides, self.strides)
    conv3x3 = functools.partial(self.conv, kernel_size=(3, 3),
                                padding=_pad(3, self.padding))
    if self.bottleneck:
      out_filters = 4 * self.filters
      y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
      y = nn.relu(self.norm(name="bn1")(y))
      # ResNet v1.5 / torchvision: the stride is on the 3x3 convolution.
      y = conv3x3(self.filters, strides=strides, name="conv2")(y)
      y = nn.relu(self.norm(name="bn2")(y))
      y = self.conv(out_filters, (1, 1), padding="VALID", name="conv3")(y)
    else:
      out_filters = self.filters
      y = conv3x3(self.filters, strides=strides, name="conv1")(x)
      y = nn.relu(self.norm(name="bn1")(y))
      y = conv3x3(self.filters, name="conv2")(y)
    # Zero-initialising the last scale makes each block start as the identity.
    y = self.norm(name="bn3" if self.bottleneck else "bn2", scale_init=(
        nn.initializers.zeros if self.zero_init_residual
        else nn.initializers.ones))(y)
    if x.shape != y.shape:
      x = self.conv(out_filters, (1, 1), strides, padding="VALID",
                    name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet v1 encoder returning the pooled representation.

  Attributes:
    stage_sizes: blocks in each of the (usually four) stages.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) or basic blocks.
    width: channel multiplier of every layer, the stem included.
    stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or 'cifar'
      (3x3/1 conv, BN, ReLU, no pooling) for 32 px images.
    num_filters: stem channels at width 1 (64 for the standard networks).
    dtype: computation dtype; parameters and the output stay float32.
    zero_init_residual: zero-initialise the last BN scale of every block.
    padding: 'symmetric' or 'same'; see the module docstring.
    bn_momentum, bn_epsilon: batch-norm moving-average decay and epsilon.
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  width: int = 1
  stem: str = "imagenet"
  num_filters: int = 64
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  padding: str = "symmetric"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps images [B, H, W, C] to [B, 512 or 2048 * width] float32.

    `train`: batch statistics (make 'batch_stats' mutable) or moving averages.
    """
    if self.stem not in _STEMS:
      raise ValueError(f"Unknown stem {self.stem!r}; allowed: {_STEMS}.")
    if self.padding not in PADDINGS:
      raise ValueError(
          f"Unknown padding {self.padding!r}; allowed: {PADDINGS}.")
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32,
                             kernel_init=conv_kernel_init)
    # No axis_name: under jit the batch axis is the global batch, so the
    # statistics are already global (cross-replica BN for free).
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = jnp.asarray(x).astype(self.dtype)
    filters = self.num_filters * self.width
    k, stride = (7, 2) if self.stem == "imagenet" else (3, 1)
    x = conv(filters, (k, k), (stride, stride), padding=_pad(k, self.padding),
             name="stem_conv")(x)                 # [B, H/stride, W/stride, F]
    x = nn.relu(norm(name="stem_bn")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2),
                      padding=_pad(3, self.padding))      # [B, H/4, W/4, F]
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        # Stage i halves the resolution (except stage 0) on its first block.
        x = Block(filters * 2**i, strides=2 if i > 0 and j == 0 else 1,
                  bottleneck=self.bottleneck, conv=conv, norm=norm,
                  zero_init_residual=self.zero_init_residual,
                  padding=self.padding, name=f"stage{i + 1}_block{j + 1}")(x)
    # Global average pool in float32: [B, h, w, D] -> [B, D].
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _layout(depth: int) -> tuple[tuple[int, ...], bool]:
  if depth not in DEPTHS:
    raise ValueError(
        f"Unsupported ResNet depth {depth}; allowed: {sorted(DEPTHS)}.")
  return DEPTHS[depth]


def depth_of(stage_sizes: Sequence[int], bottleneck: bool) -> int | None:
  """The depth whose blocks per stage are `stage_sizes`, or None."""
  layouts = {layout: depth for depth, layout in DEPTHS.items()}
  return layouts.get((tuple(stage_sizes), bool(bottleneck)))


def resnet(depth: int, **kwargs: Any) -> ResNet:
  """The unbound ResNet of `depth` (a key of DEPTHS); kwargs: other fields."""
  stage_sizes, bottleneck = _layout(depth)
  return ResNet(stage_sizes=stage_sizes, bottleneck=bottleneck, **kwargs)


def representation_dim(depth: int, width: int = 1,
                       num_filters: int = 64) -> int:
  """Size of the pooled representation of `resnet(depth, width=width)`."""
  stage_sizes, bottleneck = _layout(depth)
  return num_filters * width * 2**(len(stage_sizes) - 1) * (
      4 if bottleneck else 1)


ResNet18 = functools.partial(resnet, 18)
ResNet34 = functools.partial(resnet, 34)
