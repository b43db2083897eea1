"""Padding modes, official BYOL checkpoints in, torchvision state_dicts out."""
import collections
import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_jax import checkpoint
from byol_jax import config_lib
from byol_jax import models
from byol_jax import safe_pickle
from byol_jax.data import augment

import official_pickle


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


# ------------------------------------------------------ safe unpickling ----
class _RunsCode:
  """Unpickling it runs a shell command (the classic pickle exploit)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _evil_pickles(marker):
  command = f"touch {marker}"
  dill_style = official_pickle._Call(  # pylint: disable=protected-access
      official_pickle._Call(  # pylint: disable=protected-access
          official_pickle._Global("dill._dill", "_get_attr"),
          (official_pickle._Call(
              official_pickle._Global("dill._dill", "_import_module"),
              ("os",)), "system")), (command,))
  return {
      "os.system": lambda path: path.write_bytes(
          pickle.dumps(_RunsCode(command), protocol=2)),
      "builtins.eval": lambda path: path.write_bytes(pickle.dumps(
          _Eval(f"__import__('os').system({command!r})"), protocol=2)),
      "dill _get_attr(os)": lambda path: official_pickle.dump(
          {"x": dill_style}, path),
  }


class _Eval:

  def __init__(self, source):
    self.source = source

  def __reduce__(self):
    return eval, (self.source,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval",
                                  "dill _get_attr(os)"])
def test_restricted_unpickler_refuses_code(tmp_path, kind):
  """A pickle that would run a command is refused before anything runs."""
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  _evil_pickles(marker)[kind](path)
  with pytest.raises(safe_pickle.PickleRefusedError) as e:
    safe_pickle.load(path)
  message = str(e.value)
  assert "\n" not in message and "refused" in message, message
  assert "could run code" in message, message
  assert not marker.exists()
  if kind == "os.system":  # The payload is live: plain pickle runs it.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
  path = tmp_path / "objects.pkl"
  path.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
  with pytest.raises(safe_pickle.PickleRefusedError, match="dtype object"):
    safe_pickle.load(path)


def test_restricted_unpickler_names_bad_files(tmp_path):
  from byol_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="does not exist"):
    safe_pickle.load(tmp_path / "missing.pkl")
  path = tmp_path / "truncated.pkl"
  official_pickle.dump({"w": np.ones((4, 4), np.float32)}, path)
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(ConfigError, match="is not a readable pickle"):
    safe_pickle.load(path)


@pytest.mark.parametrize("wrap_arrays", [False, True])
def test_restricted_unpickler_reads_dill_checkpoint_layout(tmp_path,
                                                          wrap_arrays):
  """Arrays, scalars, Haiku mappings and NamedTuples written as dill does."""
  state_cls = collections.namedtuple("ScaleByLarsState", ("mu",),
                                     module="byol.utils.optimizers")
  rng = np.random.default_rng(0)
  params = {"res_net50/~/initial_conv": {"w": rng.normal(
      size=(7, 7, 3, 8)).astype(np.float32)}}
  obj = dict(experiment_state=(state_cls(
      mu=official_pickle.haiku_tree(params)),), step=np.int64(1234),
             rng=np.array([7, 9], np.uint32), counter=np.array(5, np.int32))
  path = tmp_path / "ckpt.pkl"
  official_pickle.dump(obj, path, wrap_arrays=wrap_arrays)
  got = safe_pickle.load(path)
  (lars,) = got["experiment_state"]
  assert type(lars).__name__ == "ScaleByLarsState" and lars._fields == ("mu",)
  assert type(lars.mu) is dict
  assert type(lars.mu["res_net50/~/initial_conv"]) is dict
  np.testing.assert_array_equal(lars.mu["res_net50/~/initial_conv"]["w"],
                                params["res_net50/~/initial_conv"]["w"])
  assert got["step"] == 1234 and got["step"].dtype == np.int64
  np.testing.assert_array_equal(got["rng"], [7, 9])
  assert got["counter"].shape == () and got["counter"] == 5
