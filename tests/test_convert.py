"""Padding modes, official BYOL checkpoints in, torchvision state_dicts out."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_jax import checkpoint
from byol_jax import config_lib
from byol_jax import models
from byol_jax.data import augment


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def images(imagenette_npz):
  """8 real Imagenette val images at 64 x 64, normalised [8, 64, 64, 3]."""
  with np.load(imagenette_npz) as d:
    jpeg, off = d["val_jpeg"], d["val_offsets"]
    out = []
    for i in range(0, 80, 10):  # one image of each of 8 classes
      img = Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes()))
      out.append(np.asarray(img.convert("RGB").resize((64, 64),
                                                       Image.BILINEAR)))
  return np.asarray(augment.normalize(np.stack(out).astype(np.float32) / 255))


def _randomize_batch_stats(variables, seed=0):
  """Non-trivial moving averages so that inference-mode BN matters."""
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.uniform(0.5, 2.0, x.shape) if p[-1].key == "var"
                    else rng.normal(0.0, 0.2, x.shape)).astype(np.float32),
      variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


# --------------------------------------------------------------- padding ----
def _reference_forward(variables, x, padding):
  """A 2-stage bottleneck ResNet written with lax ops directly.

  `padding` is lax's 'SAME' or PyTorch's symmetric k // 2 ('symmetric').
  """
  p, s = variables["params"], variables["batch_stats"]

  def pad(k):
    return "SAME" if padding == "same" else [(k // 2, k // 2)] * 2

  def conv(x, w, stride=1):
    k = w.shape[0]
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), pad(k) if k > 1 else "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)

  def bn(x, p, s):
    return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]

  x = conv(x, p["stem_conv"]["kernel"], 2)
  x = jax.nn.relu(bn(x, p["stem_bn"], s["stem_bn"]))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                            (1, 2, 2, 1),
                            "SAME" if padding == "same"
                            else [(0, 0), (1, 1), (1, 1), (0, 0)])
  for name, stride in (("stage1_block1", 1), ("stage2_block1", 2)):
    bp, bs = p[name], s[name]
    y = jax.nn.relu(bn(conv(x, bp["conv1"]["kernel"]), bp["bn1"], bs["bn1"]))
    y = jax.nn.relu(bn(conv(y, bp["conv2"]["kernel"], stride), bp["bn2"],
                       bs["bn2"]))
    y = bn(conv(y, bp["conv3"]["kernel"]), bp["bn3"], bs["bn3"])
    r = bn(conv(x, bp["downsample_conv"]["kernel"], stride),
           bp["downsample_bn"], bs["downsample_bn"])
    x = jax.nn.relu(y + r)
  return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("size", [64, 63])
def test_same_padding_is_lax_same(images, size):
  """'same' is lax/TF/Haiku 'SAME' in every strided layer, even and odd sizes.

  'symmetric' matches the symmetric reference, and the two modes differ on
  real images (the stride-2 layers sample other pixels), so the comparison
  can tell them apart.
  """
  x = images[:, :size, :size]
  out = {}
  for padding in ("same", "symmetric"):
    net = models.ResNet(stage_sizes=(1, 1), bottleneck=True, num_filters=4,
                        padding=padding)
    variables = _randomize_batch_stats(
        net.init(jax.random.key(0), x, train=False))
    with jax.default_matmul_precision("highest"):
      out[padding] = net.apply(variables, x, train=False)
    ref = _reference_forward(variables, x, padding)
    assert _rel_err(out[padding], ref) < 1e-5, padding
  if size % 2 == 0:
    assert _rel_err(out["same"], out["symmetric"]) > 1e-2


def test_unknown_padding_is_one_config_error():
  from byol_jax.errors import ConfigError
  from byol_jax.methods import network
  config = config_lib.base_config()
  config.model.padding = "reflect"
  with pytest.raises(ConfigError, match="model.padding='reflect'"):
    network.make_encoder(config)


def test_config_without_padding_loads_as_symmetric():
  """A checkpoint config written before model.padding existed still loads."""
  old = checkpoint.config_to_json(config_lib.base_config())
  del old["model"]["padding"]
  old["model"]["depth"] = 18
  config = checkpoint.config_from_json(old)
  assert config.model.padding == "symmetric"
  assert config.model.depth == 18
