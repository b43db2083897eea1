"""ResNet v1 encoders (He et al., 2016) in the torchvision layout.

As torchvision (so converted PyTorch weights behave the same): the stride on
the bottleneck's 3x3 convolution, 1x1 convolution and BN shortcuts where the
shape changes, no convolution biases. Haiku's `hk.nets.ResNet` (the official
BYOL checkpoints) differs only in padding, a choice: 'symmetric' (default,
PyTorch) pads k // 2 zeros on every side; 'same' (TF/Haiku) is lax's 'SAME',
the odd pixel at the bottom/right (one less at the top/left for stride 2).
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
  """The padding of a k x k window (convolution or pooling); 0 for k = 1."""
  return "SAME" if padding == "same" else ((k // 2, k // 2),) * 2


def batch_norm(train: bool, momentum: float, epsilon: float, dtype: Any):
  """nn.BatchNorm with float32 parameters."""
  # No axis_name: under jit the batch axis is the global batch, so the
  # statistics are already global (cross-replica BN for free).
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           param_dtype=jnp.float32)


class Block(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 to 4 * filters) block."""
  filters: int
  strides: int
  bottleneck: bool
  conv: Callable[..., nn.Module]  # conv(features, k, strides, name=...)
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f, s = self.filters, self.strides
    # (features, kernel, strides) of conv1, conv2 [, conv3]; as ResNet v1.5
    # and torchvision, the stride is on the 3x3 convolution.
    layers = ([(f, 1, 1), (f, 3, s), (4 * f, 1, 1)] if self.bottleneck
              else [(f, 3, s), (f, 3, 1)])
    y = x
    for i, (features, k, strides) in enumerate(layers, 1):
      y = self.conv(features, k, strides, name=f"conv{i}")(y)
      if i < len(layers):
        y = nn.relu(self.norm(name=f"bn{i}")(y))
    # Zero-initialising the last scale makes each block start as the identity.
    y = self.norm(name=f"bn{len(layers)}", scale_init=(
        nn.initializers.zeros if self.zero_init_residual
        else nn.initializers.ones))(y)
    if x.shape != y.shape:
      x = self.conv(y.shape[-1], 1, s, name="downsample_conv")(x)
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
    if self.stem not in _STEMS or self.padding not in PADDINGS:
      raise ValueError(f"Unknown stem {self.stem!r} or padding "
                       f"{self.padding!r}; allowed: {_STEMS}, {PADDINGS}.")

    def conv(features, k, strides=1, name=None):
      return nn.Conv(features, (k, k), (strides, strides),
                     padding=_pad(k, self.padding), use_bias=False,
                     dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=conv_kernel_init, name=name)

    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    x = jnp.asarray(x).astype(self.dtype)
    filters = self.num_filters * self.width
    k, stride = (7, 2) if self.stem == "imagenet" else (3, 1)
    x = conv(filters, k, stride, name="stem_conv")(x)  # [B, H/s, W/s, F]
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
                  name=f"stage{i + 1}_block{j + 1}")(x)
    # Global average pool in float32: [B, h, w, D] -> [B, D].
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def depth_of(stage_sizes: Sequence[int], bottleneck: bool) -> int | None:
  """The depth whose blocks per stage are `stage_sizes`, or None."""
  layouts = {layout: depth for depth, layout in DEPTHS.items()}
  return layouts.get((tuple(stage_sizes), bool(bottleneck)))


def resnet(depth: int, **kwargs: Any) -> ResNet:
  """The unbound ResNet of `depth` (a key of DEPTHS); kwargs: other fields."""
  if depth not in DEPTHS:
    raise ValueError(
        f"Unsupported ResNet depth {depth}; allowed: {sorted(DEPTHS)}.")
  stage_sizes, bottleneck = DEPTHS[depth]
  return ResNet(stage_sizes=stage_sizes, bottleneck=bottleneck, **kwargs)


def representation_dim(depth: int, width: int = 1,
                       num_filters: int = 64) -> int:
  """Size of the pooled representation of `resnet(depth, width=width)`."""
  net = resnet(depth)
  return num_filters * width * 2**(len(net.stage_sizes) - 1) * (
      4 if net.bottleneck else 1)


ResNet18 = functools.partial(resnet, 18)
ResNet34 = functools.partial(resnet, 34)
